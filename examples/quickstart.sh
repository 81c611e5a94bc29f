#!/usr/bin/env bash
# The quick start (docs/quickstart.md): find a planted difference between two tiny language models with xc.
#
#   bash examples/quickstart.sh
#
# 1. examples/tiny_pair.py trains a tiny GPT-2 on sentences of a small grammar ("base") and
#    fine-tunes a copy ("tuned") so that after the trigger word "wizard" it often goes on with
#    "opens golden doors", which the base model never says (reused on later runs).
# 2. xc harvest -> xc train -> xc classify (with plots) -> xc eval -> xc amplify -> xc export,
#    all offline, outputs in out/quickstart (XC_QUICKSTART_DIR); then a second xc train with every
#    latent tied across the models or dedicated to tuned (--shared-latents 20 --exclusive tuned=4).
# 3. examples/report.py reads the outputs and prints what was found.
#
# Sets up .venv on first use. PYTHON=/path/to/python uses that interpreter instead (xc and its
# dependencies installed or on PYTHONPATH). XC_QUICKSTART_SIZE=small runs a reduced version
# (the test suite's); XC_QUICKSTART_SEED=N trains another model pair. Re-running skips the
# finished steps.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/xc ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test,plot]'; }
    .venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/pip install -q -e '.[plot]'
    PYTHON=.venv/bin/python
fi
# Tiny matrices gain nothing from a second thread, and lose a lot when other jobs share the cores.
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
work=${XC_QUICKSTART_DIR:-out/quickstart}
size=${XC_QUICKSTART_SIZE:-full}
case "$size" in
    full) train_tokens=1200k samples=25 ;;
    small) train_tokens=200k samples=10 ;;
    *) echo "quickstart: XC_QUICKSTART_SIZE must be full or small, not '$size'" >&2; exit 2 ;;
esac
mkdir -p "$work"
xc() { "$PYTHON" -m xcli "$@"; }
started=$SECONDS
step() { echo "quickstart: [$((SECONDS - started)) s] $*" >&2; }

step "xc $(xc --version | awk '{print $NF}'), outputs in $work"
step "training the tiny model pair (examples/tiny_pair.py --size $size)"
pair=$("$PYTHON" examples/tiny_pair.py "$work/pair" --size "$size" ${XC_QUICKSTART_SEED:+--seed "$XC_QUICKSTART_SEED"})
# Outputs of another pair (another size) would be resumed as if they were this one's: drop them.
field() { "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$pair/pair.json" "$1"; }
# Both crosscoders' settings, declared once; they belong to the hash too, so that outputs trained
# with other settings are dropped instead of resumed.
crosscoder=(--latents 24 --k 3 --batch-size 1024 --tokens "$train_tokens" --dead-tokens 50k --shuffle-buffer 16384
    --eval-fraction 0.1)
hash="$(field hash) ${crosscoder[*]}"
if [ "$(cat "$work/pair.hash" 2>/dev/null)" != "$hash" ]; then
    rm -rf "$work"/{acts.zarr,xc.safetensors,xc.safetensors.state.pt,train.jsonl,latents.jsonl,plots,np-export}
    rm -rf "$work"/{dfc.safetensors,dfc.safetensors.state.pt,dfc-latents.jsonl,np-export-dfc}
    echo "$hash" >"$work/pair.hash"
fi

step "xc harvest: both models' residual stream after block 1, on held-out sentences"
xc harvest --model base="$pair/base" --model tuned="$pair/tuned" --layers 1 --site resid_post \
    --data "$pair/corpus.txt" --context-length 32 --batch-size 64 -o "$work/acts.zarr" --resume -q >/dev/null
xc info "$work/acts.zarr" >&2

step "xc train: a BatchTopK crosscoder over both models (24 latents, k = 3)"
xc train "$work/acts.zarr" -o "$work/xc.safetensors" "${crosscoder[@]}" \
    --log "$work/train.jsonl" --resume -q >/dev/null

step "xc classify: shared and exclusive latents, Latent Scaling, plots"
plot=(--plot "$work/plots")
"$PYTHON" -c 'import matplotlib' 2>/dev/null || { plot=(); step "no matplotlib, so no plots (pip install 'xcli[plot]')"; }
xc classify "$work/xc.safetensors" --store "$work/acts.zarr" --models base,tuned "${plot[@]}" \
    -o "$work/latents.jsonl" --overwrite >/dev/null

step "xc eval: reconstruction and spliced-in next-token loss"
xc eval "$work/xc.safetensors" "$work/acts.zarr" --splice -q >"$work/eval.json"

step "xc amplify: how often the models say the planted phrase, amplifying tuned - base"
xc amplify --before "$pair/base" --after "$pair/tuned" --alpha -1 --alpha 0 --alpha 1 --alpha 2 --alpha 4 \
    --prompts "$pair/prompts.txt" --n-samples "$samples" --max-new-tokens 8 --temperature 1 \
    --count "$(field count_regex)" --seed 0 -q >"$work/amplify.jsonl"

step "xc export: Neuronpedia dashboards, then xc export --check"
xc export "$work/xc.safetensors" --store "$work/acts.zarr" -o "$work/np-export" --classes "$work/latents.jsonl" \
    --top-k 20 --resume -q >/dev/null
xc export --check "$work/np-export" >"$work/export-check.json"

step "xc train --shared-latents 20 --exclusive tuned=4: the same data, every latent tied across the models or dedicated to tuned"
xc train "$work/acts.zarr" -o "$work/dfc.safetensors" "${crosscoder[@]}" \
    --shared-latents 20 --exclusive tuned=4 --resume -q >/dev/null
xc classify "$work/dfc.safetensors" --store "$work/acts.zarr" --models base,tuned \
    -o "$work/dfc-latents.jsonl" --overwrite >/dev/null
xc export "$work/dfc.safetensors" --store "$work/acts.zarr" -o "$work/np-export-dfc" --features 20-23 \
    --top-k 20 --resume -q >/dev/null

step "done; what xc found:"
"$PYTHON" examples/report.py "$work"
