"""Matryoshka against plain BatchTopK crosscoders: planted-feature recovery and feature absorption.

    python benchmarks/quality_matryoshka.py [--sets quick,hierarchy] [--seeds 0,1,2] [--dir D] [--tokens N]

Two planted sets, each trained with xc's default recipe (benchmarks/quality.py's `xc_train`)
as `--arch batchtopk` and as `--arch matryoshka` at the same F, k, batch and tokens:

- `quick`: quality.py's quick set (2 models x d 32, 128 features, Zipf-like firing), scored
  by quality.py's `score` (recovery at cosine > 0.9, class accuracy, FVU, L0, dead);
- `hierarchy`: one model of d 48 with 96 features, of which 8 parents with 4 mutually
  exclusive children each (`xc synth --hierarchy 8,4`), scored by `score` and by absorption.

Absorption, the measure of the Matryoshka paper (Bussmann et al. 2025, after Chanin et al.
2024, with the planted truth in place of a probe): for each parent, its latent is the one
whose decoder is closest (cosine, all sources concatenated, raw units) to the parent's
direction. On fresh rows where one of its children fires (so the parent fires too), a row is
*absorbed* when the parent's latent is silent while another active latent's decoder has
cosine >= 0.3 with the parent's direction: that latent carries the parent for this child.
Reported: the mean over parents of the absorbed share, and the parent latent's recall on those
rows (the share where it fires). Prints one JSON line per run, then the table (mean ± standard
deviation over seeds).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (benchmarks/quality.py: the trainer call and the scoring)

from xcli import console  # noqa: E402
from xcli.data.config import SynthSpec  # noqa: E402
from xcli.data.synth import PlantedDictionary, generate, sample, truth_path  # noqa: E402

ABSORBING_COSINE = 0.3
EVAL_ROWS = 20_000
SETS = {
    "quick": quality.SETS["quick"],
    "hierarchy": quality.Protocol(SynthSpec(models=("m",), width=48, shared=96, exclusive=0, active=3.0,
                                            hierarchy=(8, 4), tokens=65536), latents=192, k=4, tokens=600_000,
                                  batch_size=512),
}
GROUPS = {"quick": (16, 64), "hierarchy": (16, 64)}
"""Matryoshka prefix widths (F is added): room for the frequent features first, then 4x wider."""
ARCHS = ("batchtopk", "matryoshka")


def absorption(latents: np.ndarray, decoder: np.ndarray, directions: np.ndarray, fires: np.ndarray,
               children: dict[int, np.ndarray], cosine: float = ABSORBING_COSINE) -> dict:
    """Per parent and on average: the absorbed share of its children's rows and its latent's recall there.

    latents (N, F) activations; decoder (F, D) latent directions; directions (G, D) planted
    directions; fires (N, G) bool, which features fire on each row; children {parent: child features}."""
    unit = decoder / np.maximum(np.linalg.norm(decoder, axis=1, keepdims=True), 1e-12)
    planted = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    active = latents > 0
    per_parent = {}
    for parent, kids in children.items():
        cos = unit @ planted[parent]  # (F,)
        best = int(cos.argmax())
        rows = fires[:, kids].any(axis=1)
        carriers = (cos >= cosine) & (np.arange(len(cos)) != best)
        silent = ~active[rows, best]
        absorbed = silent & (active[rows][:, carriers].any(axis=1))
        per_parent[parent] = {"rows": int(rows.sum()), "absorbed": float(absorbed.mean()) if rows.any() else None,
                              "recall": float(1 - silent.mean()) if rows.any() else None,
                              "cosine": float(cos[best])}
    measured = [v for v in per_parent.values() if v["rows"]]
    return {"absorption": statistics.fmean(v["absorbed"] for v in measured) if measured else None,
            "parent_recall": statistics.fmean(v["recall"] for v in measured) if measured else None,
            "parent_cosine": statistics.fmean(v["cosine"] for v in per_parent.values()),
            "per_parent": per_parent}


def absorption_of(model, truth: PlantedDictionary, spec: SynthSpec, seed: int) -> dict:
    """`absorption` of a trained crosscoder on EVAL_ROWS fresh rows of the planted distribution."""
    coefficients, acts = sample(truth, EVAL_ROWS, spec.magnitude, spec.noise, np.random.default_rng([seed, 99]))
    with torch.no_grad():
        f = model.encode({n: torch.from_numpy(a) for n, a in acts.items()}).numpy()
        decoder = np.concatenate([(model.decoder_weight(n) / model.scale(n)).numpy() for n in truth.names], axis=1)
    directions = np.concatenate([truth.decoders[n] for n in truth.names], axis=1)
    return absorption(f, decoder, directions, coefficients > 0, truth.children())


def run(name: str, arch: str, seed: int, work: Path, tokens: int | None) -> dict:
    p = replace(SETS[name], tokens=tokens or SETS[name].tokens)
    store = work / f"{name}.zarr"
    if not truth_path(store).exists():
        generate(p.spec, store, overwrite=True)
    overrides = {"arch": arch, **({"groups": GROUPS[name]} if arch == "matryoshka" else {})}
    started = time.perf_counter()
    model = quality.xc_train(store, p, seed, work, overrides)
    row = {"set": name, "arch": arch, "seed": seed, "tokens": p.tokens, **quality.score(model, store, p.spec),
           "seconds": round(time.perf_counter() - started, 1)}
    truth = PlantedDictionary.load(truth_path(store))
    if truth.parents is not None:
        measured = absorption_of(model, truth, p.spec, seed)
        row.update({k: measured[k] for k in ("absorption", "parent_recall", "parent_cosine")})
    return row


def table(rows: list[dict]) -> str:
    keys = ("recovered", "class_accuracy", "fvu", "l0", "dead", "absorption", "parent_recall", "parent_cosine")
    lines = ["| set | arch | seeds | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|---|---|---:|" + "---:|" * len(keys)]
    for name in dict.fromkeys(r["set"] for r in rows):
        for arch in dict.fromkeys(r["arch"] for r in rows if r["set"] == name):
            group = [r for r in rows if r["set"] == name and r["arch"] == arch]
            label = f"matryoshka {','.join(map(str, GROUPS[name]))}" if arch == "matryoshka" else arch
            cells = [quality.spread([r.get(k) for r in group]) for k in keys]
            lines.append(f"| {name} | {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="quick,hierarchy", help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--tokens", type=int, help="training tokens instead of each set's budget")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one); stores are reused")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console.settings.quiet = True
    work = args.dir or Path(tempfile.mkdtemp(prefix="xc-matryoshka-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, started = [], time.perf_counter()
    for name in args.sets.split(","):
        for arch in args.archs.split(","):
            for seed in map(int, args.seeds.split(",")):
                row = run(name, arch, seed, work, args.tokens)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(table(rows))
    print(f"\n{(time.perf_counter() - started) / 60:.0f} min, one process of {args.threads} threads")
    return rows


if __name__ == "__main__":
    main()
