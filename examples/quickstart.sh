#!/usr/bin/env bash
# The README's main job: set up, then run the xc pipeline end to end on tiny
# offline models. It grows as subcommands land.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/xc ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test]'; }
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
work=${XC_QUICKSTART_DIR:-out/quickstart}
mkdir -p "$work"
echo "xc $(xc --version | awk '{print $3}') in $work" >&2

# Two tiny random GPT-2s sharing one tokenizer (built once, offline), and a small corpus.
if [ ! -d "$work/models/gpt2_b" ] || [ ! -f "$work/corpus.txt" ]; then
    python - "$work" <<'PY' 2>/dev/null
import sys
sys.path.insert(0, "tests")
import tiny_models
work = sys.argv[1]
tiny_models.build_all(f"{work}/models")
with open(f"{work}/corpus.txt", "w") as f:
    f.write("\n".join(tiny_models.corpus_lines(400)) + "\n")
PY
fi

# Harvest every layer of both models into one store; --resume makes a re-run a no-op.
store=$(xc harvest --model base="$work/models/gpt2" --model chat="$work/models/gpt2_b" \
    --layers all --site resid_post --context-length 64 --data "$work/corpus.txt" \
    -o "$work/acts.zarr" --resume)
echo "$store"
xc info "$store"
