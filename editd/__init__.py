"""editd: keep a served Llama up to date with a Kafka stream of facts."""

__version__ = "0.1.0"
