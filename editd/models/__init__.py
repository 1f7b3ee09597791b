"""Where served models come from: named models, GGUF import, the SmolLM2 fetch, profiles."""
