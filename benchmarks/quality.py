"""Dictionary quality: xc's training recipe against a plain reference trainer on planted sets.

    python benchmarks/quality.py [--sets two-models,layers,wide] [--seeds 0,1,2] [--dir D] [--no-readme]
    python benchmarks/quality.py --quick                  # one small set, one seed, a few seconds
    python benchmarks/quality.py --sets two-models --xc lr=2e-3 --xc clip=1   # one recipe variant
    python benchmarks/quality.py --quick --old-recipe     # the recipe before issue 16
    (--tokens N: both trainers get N tokens instead of the set's budget)

Every set is planted with `xcli.data.synth` (more features than dimensions, power-law
firing frequencies; SETS below). On each set and seed two trainers see the same
training rows (the chunks `xc train` does not hold out) for the same number of tokens:

- the reference (`reference_train`): a dense einsum encoder and decoder in float32,
  constant-lr Adam, no clipping, no warmup or decay, no AuxK, uniform random batches,
  BatchTopK with the same selection score as xc; written plainly here, sharing no code
  with xc's trainer;
- xc: `xcli.train.train` with its defaults (the set fixes only F, k, batch and tokens;
  --xc KEY=VALUE overrides a TrainConfig field, for studies of the recipe);
- xc-jumprelu (only when asked, `--trainers xc,xc-jumprelu`): xc with --arch jumprelu, the same
  F, batch and tokens, no k; `--tanh-penalty` sets its sparsity coefficient (L0 follows from it,
  so compare at the L0 the table shows).

Both are scored alike on the held-out rows (xcli.analysis): recovery (share of planted
features with a latent whose decoder has cosine > 0.9), class accuracy (two-model sets),
FVU and dead fraction; inference L0 on rows drawn anew from the planted dictionary, since xc
calibrates its BatchTopK threshold on the held-out rows (held_out_l0 in the JSON lines).
Prints one JSON line per run, then the table (mean and spread over seeds), and writes the
table into benchmarks/README.md between the quality-table markers unless --no-readme,
--quick or --xc is given.
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli import console  # noqa: E402
from xcli.analysis.evaluate import truth_metrics  # noqa: E402
from xcli.analysis.reconstruction import reconstruction  # noqa: E402
from xcli.crosscoder.model import Crosscoder, load  # noqa: E402
from xcli.data.config import SynthSpec  # noqa: E402
from xcli.data.loader import StoreSet, train_eval_chunks  # noqa: E402
from xcli.data.synth import PlantedDictionary, generate, sample, truth_path  # noqa: E402
from xcli.train import TrainConfig, train  # noqa: E402

BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
EVAL_FRACTION = 0.05


@dataclass(frozen=True)
class Protocol:
    """A planted set and the budget both trainers get on it."""

    spec: SynthSpec
    latents: int
    k: int
    tokens: int
    batch_size: int = 1024
    reference_lr: float = 2e-3


SETS = {
    # Issue 16's first set: 2 models x d 64, 256 features (192 shared, 32 exclusive to each model), Zipf-like
    # frequencies, 3.7 features per token.
    "two-models": Protocol(SynthSpec(models=("a", "b"), width=64, shared=192, exclusive=32, active=3.7,
                                     frequencies="zipf:1", tokens=131072), latents=512, k=6, tokens=6_000_000),
    # Issue 16's second set: 6 layers x d 64, 256 features spanning 1-6 layers, turning 15 degrees per layer.
    "layers": Protocol(SynthSpec(models=("m",), layers=6, width=64, shared=256, exclusive=0, span=(1, 6),
                                 drift=15.0, active=4.0, frequencies="zipf:1", tokens=65536),
                       latents=512, k=8, tokens=4_000_000),
    # Wider: 2 models x d 256, 1024 features.
    "wide": Protocol(SynthSpec(models=("a", "b"), width=256, shared=768, exclusive=128, active=4.0,
                               frequencies="zipf:1", tokens=65536), latents=2048, k=8, tokens=4_000_000),
    # The --quick set: small enough for a test, and hard enough that a poor recipe shows.
    "quick": Protocol(SynthSpec(models=("a", "b"), width=32, shared=96, exclusive=16, active=3.0,
                                frequencies="zipf:1", tokens=32768), latents=256, k=4, tokens=150_000,
                      batch_size=512),
}


# -- the reference trainer ------------------------------------------------------------------

def training_rows(store: Path) -> tuple[StoreSet, torch.Tensor, list[int]]:
    """Every training row of the store (the chunks xc does not hold out) as one (N, sum d) matrix."""
    stores = StoreSet([store])
    names = stores.names
    chunks, _ = train_eval_chunks(stores.n_chunks, EVAL_FRACTION)
    parts = [np.concatenate([stores.read_chunk(c, names)[n] for n in names], axis=1) for c in chunks]
    return stores, torch.from_numpy(np.concatenate(parts)), [s.d for s in stores.sources]


def reference_train(store: Path, p: Protocol, seed: int) -> Crosscoder:
    """The plain trainer. Returns its weights in a Crosscoder, to be scored like xc's."""
    stores, rows, widths = training_rows(store)
    L, d, F, k, B = len(widths), widths[0], p.latents, p.k, p.batch_size
    assert len(set(widths)) == 1, "the reference stacks sources of one width"
    x_all = rows.view(len(rows), L, d)
    scale = (d / x_all.pow(2).sum(-1).mean(0)).sqrt()  # per source: mean squared norm d
    x_all = x_all * scale[None, :, None]
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(F, L, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=(1, 2), keepdim=True)  # unit norm per latent over all sources
    W_enc = W_dec.permute(1, 2, 0).clone()               # (L, d, F): the decoder's transpose
    b_enc, b_dec = torch.zeros(F), x_all.mean(0).clone()
    params = [t.requires_grad_() for t in (W_enc, W_dec, b_enc, b_dec)]
    opt = torch.optim.Adam(params, lr=p.reference_lr)
    threshold, steps = 0.0, -(-p.tokens // B)
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (B,), generator=g)]
        f = torch.relu(torch.einsum("bld,ldf->bf", x, W_enc) + b_enc)
        score = f * W_dec.norm(dim=2).sum(1)
        kept = score.flatten().topk(k * B)
        f = f * torch.zeros_like(score).flatten().scatter(0, kept.indices, 1.0).view_as(f)
        x_hat = torch.einsum("bf,fld->bld", f, W_dec) + b_dec
        loss = (x_hat - x).pow(2).sum((1, 2)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        threshold = 0.999 * threshold + 0.001 * float(kept.values.min()) if step else float(kept.values.min())
    model = Crosscoder(stores.sources, F, "batchtopk", k)
    with torch.no_grad():
        for i, name in enumerate(stores.names):
            model.input_scale[i] = scale[i]
            model.encoder_weight(name).copy_(W_enc[i])
            model.decoder_weight(name).copy_(W_dec[:, i])
            model.decoder_bias(name).copy_(b_dec[i])
        model.b_enc.copy_(b_enc)
        model.threshold.fill_(threshold)
    return model.eval()


# -- xc and the scoring -----------------------------------------------------------------------

def xc_train(store: Path, p: Protocol, seed: int, work: Path, overrides: dict, jump: dict | None = None) -> Crosscoder:
    """xc's trainer; `jump`: train --arch jumprelu with these options (e.g. tanh_penalty) instead."""
    out = Path(tempfile.mkdtemp(dir=work)) / f"{store.stem}-xc-{seed}.safetensors"  # runs may overlap
    arch = {"latents": p.latents, "k": p.k} if jump is None else {"latents": p.latents, "arch": "jumprelu", **jump}
    cfg = TrainConfig(stores=(str(store),), output=str(out), overwrite=True, **arch,
                      batch_size=p.batch_size, tokens=p.tokens, seed=seed, eval_fraction=EVAL_FRACTION,
                      checkpoint_every=10**9, device="cpu")
    train(replace(cfg, **overrides))
    return load(out)


FRESH_ROWS = 16384


def fresh_l0(model: Crosscoder, truth: PlantedDictionary, spec: SynthSpec) -> float:
    """Inference L0 on rows drawn anew from the planted dictionary: rows that neither training nor xc's
    threshold calibration (made on the held-out rows) saw. The same rows for every run of a set."""
    assert spec.correlation == 0, "fresh rows are drawn without the correlation groups"
    _, acts = sample(truth, FRESH_ROWS, spec.magnitude, spec.noise, np.random.default_rng([spec.seed, 99]))
    with torch.no_grad():
        codes = model.eval().encode({n: torch.from_numpy(a) for n, a in acts.items()})
    return float((codes > 0).sum(1).float().mean())


def score(model: Crosscoder, store: Path, spec: SynthSpec) -> dict:
    stores = StoreSet([store])
    _, held = train_eval_chunks(stores.n_chunks, EVAL_FRACTION)
    result = reconstruction(model, stores, held, 4096, torch.device("cpu"))
    truth = PlantedDictionary.load(truth_path(store))
    found = truth_metrics(model, truth, 0.9, result.fired)
    accuracy = (found.get("classification") or {}).get("accuracy")
    return {"recovered": found["recovered"], "mmcs": found["mmcs"], "class_accuracy": accuracy,
            "fvu": result.fvu_total, "l0": fresh_l0(model, truth, spec), "held_out_l0": result.l0,
            "dead": 1 - float(result.fired.mean())}


def planted(name: str, work: Path) -> Path:
    store = work / f"{name}.zarr"
    if not truth_path(store).exists():
        generate(SETS[name].spec, store, overwrite=True)
    return store


def run(name: str, trainer: str, seed: int, work: Path, overrides: dict, tokens: int | None = None,
        jump: dict | None = None) -> dict:
    p, store = SETS[name], planted(name, work)
    p = replace(p, tokens=tokens or p.tokens)
    started = time.perf_counter()
    if trainer == "reference":
        model = reference_train(store, p, seed)
    elif trainer == "xc-jumprelu":
        model = xc_train(store, p, seed, work, {}, jump or {})
    else:
        model = xc_train(store, p, seed, work, overrides)
    seconds = time.perf_counter() - started
    return {"set": name, "trainer": trainer, "seed": seed, "tokens": p.tokens, **score(model, store, p.spec),
            "seconds": round(seconds, 1), "tokens_per_s": round(p.tokens / seconds)}


# -- reporting --------------------------------------------------------------------------------

def spread(values: list[float]) -> str:
    if any(v is None for v in values):
        return "—"
    mean = statistics.fmean(values)
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}" if len(values) > 1 else f"{mean:.3g}"


def table(rows: list[dict]) -> str:
    lines = ["| set | protocol | trainer | seeds | recovered | class accuracy | FVU | inference L0 | dead |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["set"] for r in rows):
        p = SETS[name]
        tokens = next(r["tokens"] for r in rows if r["set"] == name)
        proto = (f"{len(p.spec.models)}×{p.spec.layers} sources of d {p.spec.width}, {p.spec.n_features} features; "
                 f"F {p.latents}, k {p.k}, batch {p.batch_size}, {tokens / 1e6:g}M tokens")
        for trainer in dict.fromkeys(r["trainer"] for r in rows if r["set"] == name):
            group = [r for r in rows if r["set"] == name and r["trainer"] == trainer]
            label = f"reference (lr {p.reference_lr:g})" if trainer == "reference" else trainer
            if trainer == "xc-jumprelu" and group[0].get("jumprelu"):
                label += f" (tanh penalty {group[0]['jumprelu']['tanh_penalty']:g})"
            cells = [spread([r[key] for r in group]) for key in ("recovered", "class_accuracy", "fvu", "l0", "dead")]
            lines.append(f"| {name} | {proto} | {label} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_readme(text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between two markers of benchmarks/README.md (quality_archs.py has its own markers)."""
    readme = ROOT / "benchmarks" / "README.md"
    content = readme.read_text()
    if begin not in content or end not in content:
        raise SystemExit(f"benchmarks/README.md has no {begin} ... {end} block to rewrite")
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="two-models,layers,wide", help="comma-separated: " + ", ".join(SETS))
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--trainers", default="reference,xc", help="reference, xc or both")
    parser.add_argument("--xc", action="append", default=[], metavar="KEY=VALUE",
                        help="override a TrainConfig field of the xc runs (a recipe study)")
    parser.add_argument("--tokens", type=int, help="training tokens for both trainers instead of the set's budget")
    parser.add_argument("--tanh-penalty", type=float, help="xc-jumprelu: its --tanh-penalty (default xc's)")
    parser.add_argument("--quick", action="store_true", help="the quick set, seed 0, xc only")
    parser.add_argument("--old-recipe", action="store_true",
                        help="xc as before issue 16: decoder rows of norm 0.1 per source, a 10M-token dead window, "
                             "the running-average BatchTopK threshold only")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one); stores are reused")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.quick:
        args.sets, args.seeds, args.trainers = "quick", "0", "xc"
    threads, quiet = torch.get_num_threads(), console.settings.quiet
    torch.set_num_threads(args.threads)
    console.settings.quiet = True
    if args.old_recipe:
        args.xc = [OLD_DEAD_WINDOW, *args.xc]
    try:
        with old_recipe(args.old_recipe):
            return study(args, sets_of(args))
    finally:
        torch.set_num_threads(threads)
        console.settings.quiet = quiet


OLD_DEAD_WINDOW = "dead_tokens=10000000"  # the --xc override that goes with old_recipe()


@contextlib.contextmanager
def old_recipe(active: bool = True):
    """While active, xc initialises and calibrates as before issue 16: decoder rows of norm 0.1
    per source, and the running average of batch minima as the BatchTopK threshold."""
    init, calibrate = Crosscoder.init_weights, Crosscoder.calibrate_threshold
    if active:
        Crosscoder.init_weights = lambda self, generator=None, decoder_norm=None: init(self, generator, 0.1)
        Crosscoder.calibrate_threshold = lambda self, batches, candidates=4: float(self.threshold)
    try:
        yield
    finally:
        Crosscoder.init_weights, Crosscoder.calibrate_threshold = init, calibrate


def sets_of(args) -> list[str]:
    sets = args.sets.split(",")
    for name in sets:
        if name not in SETS:
            raise SystemExit(f"--sets: unknown set {name!r}; sets are {', '.join(SETS)}")
    return sets


def study(args, sets: list[str]) -> list[dict]:
    overrides = dict(map(parse_override, args.xc))
    work = args.dir or Path(tempfile.mkdtemp(prefix="xc-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    started, rows = time.perf_counter(), []
    for name in sets:
        for trainer in args.trainers.split(","):
            for seed in seeds:
                jump = {} if args.tanh_penalty is None else {"tanh_penalty": args.tanh_penalty}
                row = run(name, trainer, seed, work, overrides, args.tokens, jump)
                if trainer == "xc-jumprelu" and jump:
                    row["jumprelu"] = jump
                if overrides and trainer == "xc":
                    row["overrides"] = overrides
                print(json.dumps(row), flush=True)
                rows.append(row)
    elapsed = time.perf_counter() - started
    every_set = sets == ["two-models", "layers", "wide"]
    command = ("python benchmarks/quality.py" + ("" if every_set else f" --sets {args.sets}")
               + (f" --tokens {args.tokens}" if args.tokens else "")
               + (f" --trainers {args.trainers}" if args.trainers != "reference,xc" else "")
               + (f" --seeds {args.seeds}" if args.seeds != "0,1,2" else "")
               + (f" --tanh-penalty {args.tanh_penalty:g}" if args.tanh_penalty is not None else ""))
    text = f"{table(rows)}\n\n`{command}` ({elapsed / 60:.0f} min, one process of {args.threads} threads)."
    print(text)
    if not (args.no_readme or args.quick or overrides or "xc-jumprelu" in args.trainers):
        write_readme(text)
    return rows


if __name__ == "__main__":
    main()
