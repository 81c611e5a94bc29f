"""Finding model-exclusive features: plain BatchTopK against designated shared latents and DFC.

    python benchmarks/dfc_recall.py [--seeds 0,1,2] [--triggers 0.5,1] [--sizes 4,8] [--dir /tmp/xc-dfc]

A planted store per seed and trigger (`xc synth`): two models a and b of width 16, 12 shared
features and 4 features exclusive to each model, 3 active per token, 8192 rows. With
`--trigger T` every exclusive feature fires only with a shared feature (its trigger), on T of
its firings, as a fine-tune's trigger word does: a plain crosscoder can absorb the exclusive
feature into a latent of the trigger whose decoders differ between the models. Each seed
trains BatchTopK with F = 48 latents, k = 3, 400 steps of 256 rows, lr 4e-3, on the same
store and data order:

    plain       no partition
    tied        --shared-latents 24                        (designated shared latents, rest free)
    dfcN        --exclusive a=N --exclusive b=N            (dedicated blocks, rest free)
    fullN       --shared-latents F-2N --exclusive a=N --exclusive b=N  (every latent tied or dedicated)

and `xc classify` labels the latents. Scores against the truth (decoder cosine over both
models' sources concatenated, raw units):

    recall     planted exclusive features of model m with a latent of cosine > 0.9 that is
               classified exclusive:m or dedicated:m
    precision  latents classified exclusive:m or dedicated:m (and alive by decoder norm) whose
               best planted feature (cosine > 0.9) is exclusive to m
    fp_shared  planted shared features whose best latent is classified exclusive or dedicated

Prints one JSON line per run and a table of means over the seeds (min-max in brackets).
"""

import argparse
import json
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
LATENTS = 48


def variants(sizes: list[int], latents: int) -> dict[str, dict]:
    out = {"plain": {}, "tied": {"shared_latents": latents // 2}}
    for n in sizes:
        out[f"dfc{n}"] = {"exclusive": (f"a={n}", f"b={n}")}
    for n in sizes:
        out[f"full{n}"] = {"shared_latents": latents - 2 * n, "exclusive": (f"a={n}", f"b={n}")}
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
    parser.add_argument("--triggers", default="0.5,1", help="--trigger of the planted stores, comma-separated")
    parser.add_argument("--sizes", default="4,8", help="dedicated latents per model, comma-separated")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--only", default=None, help="comma-separated variant names to run")
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    console.settings.quiet = True
    work = Path(args.dir or tempfile.mkdtemp(prefix="xc-dfc-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = variants([int(n) for n in args.sizes.split(",")], LATENTS)
    if args.only:
        runs = {k: v for k, v in runs.items() if k in args.only.split(",")}
    tables = []
    for trigger in map(float, args.triggers.split(",")):
        results: dict[str, list[dict]] = {name: [] for name in runs}
        for seed in map(int, args.seeds.split(",")):
            store = work / f"synth-s{seed}-t{trigger}.zarr"
            if not store.exists():
                generate(load_spec(None, models=("a", "b"), width=16, shared=12, exclusive=4, active=3.0,
                                   tokens=8192, trigger=trigger, seed=seed), store)
            truth = PlantedDictionary.load(truth_path(store))
            for name, options in runs.items():
                out = work / f"{name}-s{seed}-t{trigger}.safetensors"
                started = time.perf_counter()
                train(TrainConfig(stores=(str(store),), output=str(out), overwrite=True, arch="batchtopk",
                                  latents=LATENTS, k=3, batch_size=256, lr=4e-3, steps=args.steps,
                                  eval_fraction=0.05, dead_tokens=2000, shuffle_buffer=4096,
                                  checkpoint_every=10 ** 6, device="cpu", seed=seed, **options))
                model = load(out)
                result = classify(model, open_store(store), ClassifyConfig(device="cpu"))
                row = {"variant": name, "seed": seed, "trigger": trigger,
                       **score(truth, model, result.classes), "fvu": model.metadata["training"]["fvu_total"],
                       "seconds": round(time.perf_counter() - started, 1)}
                print(json.dumps(row), flush=True)
                results[name].append(row)
        tables.append(table(results, f"trigger {trigger}, seeds {args.seeds}, {args.steps} steps"))
    print("\n" + "\n\n".join(tables))


def table(results: dict[str, list[dict]], title: str) -> str:
    lines = [f"{title}; mean (min-max)", "",
             "| variant | recall | precision | fp_shared | shared recovered | FVU |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        def cell(key, digits=2, rows=rows):
            values = [r[key] for r in rows if r[key] is not None]
            if not values:
                return "-"
            return f"{np.mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
        lines.append(f"| {name} | {cell('recall')} | {cell('precision')} | {cell('fp_shared')} | "
                     f"{cell('shared_recovered')} | {cell('fvu', 3)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
