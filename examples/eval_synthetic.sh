#!/usr/bin/env bash
# Plant a dictionary, train a crosscoder on it, and score what it found.
#
#     bash examples/eval_synthetic.sh [WORKDIR]
#
# `xc synth diff` writes two "models" with 48 shared, 16 + 16 exclusive and 8 + 8
# scale-changed features; `xc eval --truth` reports FVU and L0 on the held-out rows,
# the planted features recovered (cosine > 0.9) by kind, and how often `xc classify`
# puts each feature's latent in the planted class. About a minute on a laptop CPU.
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work"
export OMP_NUM_THREADS=1   # tiny matmuls: one thread is fastest

xc synth diff -o "$work/toy.zarr" --overwrite |
    xc train - -o "$work/toy.safetensors" --overwrite --arch topk --latents 192 --k 4 \
        --batch-size 512 --lr 4e-3 --tokens 655360 --eval-fraction 0.05 --dead-tokens 5000 |
    xc eval - "$work/toy.zarr" --truth "$work/toy.zarr.truth.safetensors" |
    python3 -c '
import json, sys
r = json.load(sys.stdin)
t = r["truth"]
print("held-out FVU %.3f, L0 %.2f, dead %.2f" % (r["fvu_total"], r["l0"], r["dead_fraction"]))
print("recovered %.0f%% of %d planted features (MMCS %.3f)" % (100 * t["recovered"], t["features"], t["mmcs"]))
for kind, row in t["by_kind"].items():
    print("  %-12s recovered %3.0f%%, classified as planted %3.0f%%"
          % (kind, 100 * row["recovered"], 100 * t["classification"]["by_kind"][kind]))
'
