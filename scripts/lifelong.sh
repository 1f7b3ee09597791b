#!/usr/bin/env bash
# Lifelong editing on SmolLM2-135M: sequential CounterFact edits through the daemon's apply
# path, one curve per method (docs/lifelong/). Resumable: run it again after an interruption
# and each method continues from its edit store. Usage:
#   scripts/lifelong.sh EDITS [METHOD...]     METHOD: emmet, emmet-soft, memit, alphaedit
set -euo pipefail
edits=${1:?number of edits}
shift
methods=("${@:-emmet emmet-soft memit alphaedit}")
data=${EDITD_SHARED_DATA:-../shared/data}
out=docs/lifelong
work=${EDITD_LIFELONG_DIR:-editd-lifelong}
mkdir -p "$out" "$work"
for method in ${methods[@]}; do
  algo=$method
  env=()
  if [ "$method" = emmet-soft ]; then
    # The seed paper's soft constraints: KᵀC⁻¹K + 0.1·I.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1)
  fi
  env "${env[@]}" editd bench edit --model smollm2-135m --algo "$algo" \
    --dataset "$data/counterfact/counterfact-edit.json" --text "$data/wikitext-2/valid.txt" \
    --edits "$edits" --batch-size 100 --seed 0 \
    --store "$work/$method-$edits" --curve "$out/$method-$edits.jsonl" --curve-every 100 \
    --json > "$out/$method-$edits.json"
done
