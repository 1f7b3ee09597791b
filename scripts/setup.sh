#!/usr/bin/env bash
# Create .venv and install editd into it. Idempotent; safe to run before every command.
#   scripts/setup.sh        the daemon
#   scripts/setup.sh test   the daemon, the dev tools, and the system tools the tests use
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU wheel: otherwise pip resolves `torch` to the newest release with
# gigabytes of CUDA packages. A venv that already has a torch (a GPU user's own build) keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
stamp=.venv/.editd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e '.[dev]'
  touch "$stamp"
fi

if [ "${1:-}" = "test" ]; then
  # Real Prometheus/promtool, kcat (an independent Kafka client) and stunnel (a TLS endpoint
  # in front of the embedded broker) for the integration tests.
  need=()
  command -v prometheus >/dev/null || need+=(prometheus)
  command -v kcat >/dev/null || need+=(kcat)
  command -v stunnel4 >/dev/null || need+=(stunnel4)
  if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
      echo "setup: ${need[*]} missing and not root; the tests that need them will skip" >&2
    fi
  fi
fi
