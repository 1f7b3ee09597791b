#!/usr/bin/env bash
# Lifelong editing on SmolLM2-135M: sequential CounterFact edits through the daemon's apply
# path, one curve per method (docs/lifelong/). Resumable: run it again after an interruption
# and each method continues from its edit store. Usage:
#   scripts/lifelong.sh EDITS [METHOD...]
# METHOD: emmet, emmet-soft, memit, alphaedit, encore, emmet-mpes, emmet-wide, emmet-mpes-wide,
# emmet-ridge, emmet-wide-ridge, emmet-seven, gated, gated-refine, gated-exact.
# Extra settings for every method come from the environment as usual (EDITD_EDITING__...).
# CURVE_EVERY=N measures a curve point every N edits (default 100; a point over 100 sampled edits
# costs about twice a batch's edit, so long runs may space them out).
# CONSOLIDATE=N re-solves every live fact jointly after each N edits (`--consolidate-every`);
# its runs are named METHOD-cN-EDITS, or METHOD-cNeE-EDITS with the re-solve's ε set by
# CONSOLIDATE_EPS=E. SEED=S draws another edit order (default 0); its runs are named METHOD-sS-EDITS.
set -euo pipefail
edits=${1:?number of edits}
shift
methods=("${@:-emmet emmet-soft memit alphaedit}")
data=${EDITD_SHARED_DATA:-../shared/data}
out=docs/lifelong
work=${EDITD_LIFELONG_DIR:-editd-lifelong}
wide="[3,4,5,6,7,8,9,10,11,12]"
mkdir -p "$out" "$work"
for method in ${methods[@]}; do
  algo=$method
  env=()
  if [ "$method" = emmet ]; then
    # Exact constraints (ε = 0); SmolLM2's profile now ships ε = 0.1, which is emmet-soft.
    env=(EDITD_EDITING__EMMET_EPS=0)
  elif [ "$method" = emmet-soft ]; then
    # The seed paper's soft constraints: KᵀC⁻¹K + 0.1·I.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1)
  elif [ "$method" = encore ]; then
    # ENCORE: MEMIT with most-probable early stopping and the Frobenius-norm constraint.
    algo=memit
    env=(EDITD_EDITING__TARGET_STOP_PROB=0 EDITD_EDITING__NORM_WEIGHT=${ENCORE_NORM:-0.5})
  elif [ "$method" = emmet-mpes ]; then
    # Soft EMMET with ENCORE's early stopping: targets stop once the new object is top-1.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 EDITD_EDITING__TARGET_STOP_PROB=0)
  elif [ "$method" = emmet-wide ]; then
    # Soft EMMET over twice the layers (3-12 around the traced 4-8): capacity grows with the
    # total key width.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 "EDITD_EDITING__LAYERS=$wide")
  elif [ "$method" = emmet-seven ]; then
    # Soft EMMET over seven adjacent layers (3-9): more key width than 4-8 without the
    # far-apart layers that wrecked 3-12.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 "EDITD_EDITING__LAYERS=[3,4,5,6,7,8,9]")
  elif [ "$method" = emmet-ridge ]; then
    # Soft EMMET with ENCORE's norm constraint alone: a floor under C0's small eigenvalues,
    # which 15,360 tokens estimate worst and an exact-constraint update leans on most.
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 EDITD_EDITING__NORM_WEIGHT=${RIDGE:-1.0})
  elif [ "$method" = emmet-wide-ridge ]; then
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 EDITD_EDITING__NORM_WEIGHT=${RIDGE:-1.0}
      "EDITD_EDITING__LAYERS=$wide")
  elif [ "$method" = gated ]; then
    # The gated edit memory (editing.memory: gated) with the profile's EMMET: each batch's
    # update acts only where one of its facts' keys is read. No refine round, as its curves
    # were measured before the profile shipped one (that is gated-refine).
    algo=emmet
    env=(EDITD_EDITING__MEMORY=gated EDITD_EDITING__REFINE_ROUNDS=0)
  elif [ "$method" = gated-refine ]; then
    # The gated memory with refine passes for the facts a batch leaves short of greedy top-1
    # (REFINE rounds, default 1).
    algo=emmet
    env=(EDITD_EDITING__MEMORY=gated EDITD_EDITING__REFINE_ROUNDS=${REFINE:-1})
  elif [ "$method" = gated-exact ]; then
    algo=emmet
    env=(EDITD_EDITING__MEMORY=gated EDITD_EDITING__EMMET_EPS=0)
  elif [ "$method" = emmet-mpes-wide ]; then
    algo=emmet
    env=(EDITD_EDITING__EMMET_EPS=0.1 EDITD_EDITING__TARGET_STOP_PROB=0
      "EDITD_EDITING__LAYERS=$wide")
  fi
  name=$method${SEED:+-s$SEED}
  extra=()
  if [ -n "${CONSOLIDATE:-}" ]; then
    name=$name-c$CONSOLIDATE
    extra=(--consolidate-every "$CONSOLIDATE")
    if [ -n "${CONSOLIDATE_EPS:-}" ]; then
      name=${name}e$CONSOLIDATE_EPS
      env+=("EDITD_EDITING__CONSOLIDATE_EPS=$CONSOLIDATE_EPS")
    fi
  fi
  env "${env[@]}" editd bench edit --model smollm2-135m --algo "$algo" \
    --dataset "$data/counterfact/counterfact-edit.json" --text "$data/wikitext-2/valid.txt" \
    --edits "$edits" --batch-size 100 --seed "${SEED:-0}" \
    --store "$work/$name-$edits" --curve "$out/$name-$edits.jsonl" --curve-every "${CURVE_EVERY:-100}" \
    "${extra[@]}" --json > "$out/$name-$edits.json"
done
