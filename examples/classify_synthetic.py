"""Classify the latents of a crosscoder trained on planted two-model data, and catch a false exclusive.

    python examples/classify_synthetic.py [WORKDIR]

Models "a" and "b" share 8 features and have 4 of their own each. Feature 0 is shared, but
in b it is 0.4 times as strong (same direction). A ReLU crosscoder's L1 penalty shrinks
that latent's b decoder to zero, so by decoder norms it looks exclusive to a; Latent
Scaling finds the direction still in b's reconstruction error and flags it ("shrinkage").
Writes latents.jsonl and figures to WORKDIR; under a minute on a laptop CPU.
"""

import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import xcli
from xcli.data import synth
from xcli.data.store import StoreWriter
from xcli.source import Source

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="xc-classify-"))
work.mkdir(parents=True, exist_ok=True)

# A planted dictionary with one weakly shared feature, written as an ordinary store.
truth = synth.plant(["a", "b"], {"a": 16, "b": 16}, n_shared=8, n_exclusive=4, active=3.0, decay=1.0,
                    rng=np.random.default_rng([3, 0]))
decoders = {name: rows.copy() for name, rows in truth.decoders.items()}
decoders["b"][0] = 0.4 * decoders["a"][0]
truth = dataclasses.replace(truth, decoders=decoders)
store = work / "planted.zarr"
writer = StoreWriter(store, [Source(n, n, "synthetic", None, 16) for n in truth.names], dtype="float32",
                     chunk_rows=1024)
for block in range(2):
    writer.append(synth.sample(truth, 4096, (0.5, 1.5), 0.0, np.random.default_rng([3, 1, block]))[1])
writer.close()


def xc(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "xcli", *args], check=True, capture_output=True,
                          text=True).stdout


checkpoint = xc("train", str(store), "-o", str(work / "xc.safetensors"), "--overwrite", "--arch", "relu",
                "--l1", "2", "--latents", "32", "--batch-size", "256", "--tokens", "24576",
                "--eval-fraction", "0.05", "--dead-tokens", "5000", "--shuffle-buffer", "4096").strip()
# In Python: xcli.analysis.classify.classify(xcli.load(checkpoint), xcli.data.store.open_store(store)).
xc("classify", checkpoint, "--store", str(store), "--plot", str(work / "figures"), "--overwrite",
   "-o", str(work / "latents.jsonl"))
rows = [json.loads(line) for line in (work / "latents.jsonl").read_text().splitlines()]

found = synth.match(truth, xcli.load(checkpoint))
print(f"{work}: latents.jsonl, figures/")
print("planted        latent  class           r      nu_eps  nu_r   verdict")
for g, kind in enumerate(truth.kinds):
    row = rows[found.latent[g]]
    label = "weak shared" if g == 0 else kind
    print(f"{label:14s} {row['latent']:6d}  {row['class']:14s} {row['rel_norm_B_over_A']:.3f}  "
          f"{row['nu_epsilon']:6.2f}  {row['nu_r']:5.2f}  {row['ls_verdict'] or '-'}")
