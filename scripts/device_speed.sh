#!/usr/bin/env bash
# The GPU speed check as one prepared command, for a session lent a device machine.
#
# That machine has no package registry. Its python3 holds torch, transformers, tokenizers,
# safetensors, tqdm and pyyaml, but not pydantic, which editd's settings need. So, here first:
#   scripts/device_speed.sh --fetch      # wheels for Python 3.12 into .whl/ (git-ignored)
# then on the device machine, carrying .whl (timeout_s 600 leaves room for one rerun):
#   scripts/device_speed.sh              # prints one JSON object per algorithm, and keeps
#                                        # them in $OUT/speed.jsonl
# The model has random weights, so the quality guards are off (each object says which, under
# "guards_off"); every stage is timed, with the swap pause and per-token serving time.
# Checked end to end on CPU with SHAPE=tiny DEVICE=cpu DTYPE=float32 EDITS=6 BATCH=3.
# SHAPE, DEVICE, DTYPE, EDITS, BATCH, ALGOS and PYTHON override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 python-dotenv==1.2.4)

if [ "${1:-}" = "--fetch" ]; then
  exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
fi

if ! "$PY" -c "import pydantic_settings" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
out=${OUT:-.}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
for algo in ${ALGOS:-emmet memit}; do
  "$PY" -m editd bench speed --shape "${SHAPE:-llama3-8b}" --device "${DEVICE:-cuda}" \
    --dtype "${DTYPE:-bfloat16}" --algo "$algo" --edits "${EDITS:-300}" \
    --batch-size "${BATCH:-100}" --json | tee -a "$out/speed.jsonl"
done
