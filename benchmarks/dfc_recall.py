"""Finding model-exclusive features: plain BatchTopK against designated shared latents and DFC.

    python benchmarks/dfc_recall.py [--seeds 0,1,2] [--trigger 1.0] [--steps 1500] [--dir /tmp/xc-dfc]

A planted store (`xc synth`): two models a and b of width 32, 48 shared features and 8
features exclusive to each model. With --trigger T every exclusive feature fires only with a
shared feature (its trigger), on T of its firings, as a fine-tune's trigger word does: a plain
crosscoder can absorb the exclusive feature into the trigger's latent, whose decoders then
differ between the models. Each seed trains, on the same store and data order:

    plain       xc train --arch batchtopk --latents 128 --k 4
    tied        ... --shared-latents 64                  (designated shared latents)
    dfc         ... --exclusive a=16 --exclusive b=16    (dedicated-feature crosscoder)
    tied+dfc    ... --shared-latents 64 --exclusive a=16 --exclusive b=16
    (--partition N sets the dedicated block size; each run also gets the sizes in --sizes)

and `xc classify --store` labels the latents. Scores against the truth (decoder cosine over
both models' sources concatenated, raw units):

    recall     planted exclusive features of model m with a latent of cosine > 0.9 that is
               classified exclusive:m or dedicated:m
    precision  latents classified exclusive:m or dedicated:m whose best planted feature (cosine
               > 0.9) is exclusive to m
    fp_shared  planted shared features whose best latent is classified exclusive or dedicated

Prints one JSON line per run and a table of means over the seeds (min-max in brackets).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli import console  # noqa: E402
from xcli.analysis.classify import classify  # noqa: E402
from xcli.analysis.config import ClassifyConfig  # noqa: E402
from xcli.crosscoder.model import load  # noqa: E402
from xcli.data.store import open_store  # noqa: E402
from xcli.data.synth import PlantedDictionary, generate, load_spec, truth_path  # noqa: E402
from xcli.train import TrainConfig, train  # noqa: E402

THRESHOLD = 0.9


def variants(sizes: list[int], tied: int) -> dict[str, dict]:
    out = {"plain": {}, "tied": {"shared_latents": tied}}
    for n in sizes:
        out[f"dfc{n}"] = {"exclusive": (f"a={n}", f"b={n}")}
        out[f"tied+dfc{n}"] = {"shared_latents": tied, "exclusive": (f"a={n}", f"b={n}")}
    return out


def score(truth: PlantedDictionary, model, classes: list[str]) -> dict:
    """Recall and precision of exclusive features, and the false-positive rate among shared ones."""
    names = list(truth.names)
    raw = np.concatenate([(model.decoder_weight(n) / model.scale(n)).detach().numpy() for n in names], axis=1)
    planted = np.concatenate([truth.decoders[n] for n in names], axis=1)
    planted = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    learned = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    cos = planted @ learned.T  # (G, F)
    kinds = list(truth.kinds)

    def owner(label: str) -> str | None:
        kind, _, model_name = label.partition(":")
        return model_name if kind in ("exclusive", "dedicated") else None

    owners = [owner(c) for c in classes]
    exclusive = [g for g, k in enumerate(kinds) if k.startswith("exclusive:")]
    found = [any(cos[g, j] > THRESHOLD and owners[j] == kinds[g].split(":")[1] for j in range(len(classes)))
             for g in exclusive]
    flagged = [j for j, o in enumerate(owners) if o is not None]
    best = cos.argmax(axis=0)
    right = [cos[best[j], j] > THRESHOLD and kinds[best[j]] == f"exclusive:{owners[j]}" for j in flagged]
    shared = [g for g, k in enumerate(kinds) if k == "shared"]
    fp = [owners[int(cos[g].argmax())] is not None for g in shared]
    return {"recall": float(np.mean(found)), "precision": float(np.mean(right)) if flagged else None,
            "flagged": len(flagged), "fp_shared": float(np.mean(fp)),
            "shared_recovered": float(np.mean([cos[g].max() > THRESHOLD for g in shared]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--trigger", type=float, default=1.0)
    parser.add_argument("--sizes", default="16", help="dedicated latents per model, comma-separated")
    parser.add_argument("--tied", type=int, default=64, help="--shared-latents of the tied variants")
    parser.add_argument("--latents", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--only", default=None, help="comma-separated variant names to run")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    console.settings.quiet = True
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.dir or tempfile.mkdtemp(prefix="xc-dfc-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = variants([int(n) for n in args.sizes.split(",")], args.tied)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    for seed in map(int, args.seeds.split(",")):
        store = work / f"synth-s{seed}-t{args.trigger}.zarr"
        if not store.exists():
            generate(load_spec(None, models=("a", "b"), width=32, shared=48, exclusive=8, active=4.0,
                               tokens=32768, trigger=args.trigger, seed=seed), store)
        truth = PlantedDictionary.load(truth_path(store))
        for name, options in runs.items():
            out = work / f"{name}-s{seed}-t{args.trigger}.safetensors"
            started = time.perf_counter()
            train(TrainConfig(stores=(str(store),), output=str(out), overwrite=True, arch="batchtopk",
                              latents=args.latents, k=args.k, batch_size=512, lr=4e-3, steps=args.steps,
                              eval_fraction=0.05, dead_tokens=5000, shuffle_buffer=16384,
                              checkpoint_every=10 ** 6, device="cpu", seed=seed, **options))
            model = load(out)
            result = classify(model, open_store(store), ClassifyConfig(device="cpu"))
            row = {"variant": name, "seed": seed, "trigger": args.trigger, **score(truth, model, result.classes),
                   "fvu": model.metadata["training"]["fvu_total"]}
            row["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(row), flush=True)
            results[name].append(row)
    print(f"\ntrigger {args.trigger}, seeds {args.seeds}, {args.steps} steps; mean (min-max)")
    print("| variant | recall | precision | fp_shared | shared recovered | FVU |")
    print("|---|---|---|---|---|---|")
    for name, rows in results.items():
        def cell(key, digits=2, rows=rows):
            values = [r[key] for r in rows if r[key] is not None]
            if not values:
                return "-"
            return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
        print(f"| {name} | {cell('recall')} | {cell('precision')} | {cell('fp_shared')} | "
              f"{cell('shared_recovered')} | {cell('fvu', 3)} |")


if __name__ == "__main__":
    main()
