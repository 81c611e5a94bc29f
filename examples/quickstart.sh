#!/usr/bin/env bash
# The README's main job: set up, then run the xc pipeline end to end on tiny
# offline models: harvest -> train -> classify -> eval -> export -> amplify.
# Every step is idempotent (--resume), so a second run only prints the summary.
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
xc info "$store" >&2

# A BatchTopK crosscoder over all six sources (3 layers x 2 models).
ckpt=$(xc train "$store" -o "$work/xc.safetensors" --arch batchtopk --latents 256 --k 8 \
    --batch-size 512 --tokens 200K --resume)
echo "$ckpt"

# Label every latent: shared / exclusive:base / exclusive:chat / mixed / dead.
plot=()
python -c "import matplotlib" 2>/dev/null && plot=(--plot "$work/plots" --overwrite)
xc classify "$ckpt" --store "$store" "${plot[@]}" > "$work/latents.jsonl.tmp"
mv "$work/latents.jsonl.tmp" "$work/latents.jsonl"

# Held-out FVU, L0 and the spliced-in next-token loss of both models.
xc eval "$ckpt" "$store" --splice > "$work/eval.json"

# Neuronpedia batch export, validated.
xc export "$ckpt" --store "$store" --classes "$work/latents.jsonl" -o "$work/export" --resume > /dev/null
xc export --check "$work/export" > /dev/null

# Logit diff amplification between the two models, greedy, alpha 0 and 2.
xc amplify --before "$work/models/gpt2" --after "$work/models/gpt2_b" --alpha 0 --alpha 2 \
    --prompt "the cat sees" --max-new-tokens 8 --temperature 0 > "$work/amplify.jsonl"

python - "$work" <<'PY'
import collections, json, sys
work = sys.argv[1]
rows = [json.loads(line) for line in open(f"{work}/latents.jsonl")]
classes = collections.Counter(row["class"] for row in rows)
report = json.load(open(f"{work}/eval.json"))
print(f"latents: {dict(sorted(classes.items()))}")
print(f"held-out FVU {report['fvu_total']:.3f}, L0 {report['l0']:.1f}, dead {report['dead_fraction']:.2f}")
for alias, s in (report.get("splice") or {}).items():
    if isinstance(s, dict) and "ce_score" in s:
        print(f"{alias}: CE clean {s['ce_clean']:.3f}, spliced {s['ce_spliced']:.3f}, CE score {s['ce_score']}")
for line in open(f"{work}/amplify.jsonl"):
    r = json.loads(line)
    if r.get("kind") == "completion":
        print(f"alpha {r['alpha']}: {r['prompt']!r} -> {r['completion']!r}")
print(f"export: {work}/export (checked)")
PY
