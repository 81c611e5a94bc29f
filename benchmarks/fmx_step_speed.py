"""Training-step time of an fmxcoder against the acausal crosscoder of the same shape.

Both run xc's real step (xcli.train.loop.train_step, BatchTopK on the sparse path, fused Adam) on
one random batch over L layers of width d (`--dead`: with a share of the latents dead, so that
AuxK acts). Variants run interleaved, `--steps` steps each per
repeat, after a warm-up step; the figures are medians over repeats, and the ratio is taken within
each repeat (the CPU is shared, so only same-run ratios mean anything).

Variants: `acausal`; `fmx`, the step as `xc train` runs it (each tensor contracted with the batch or
materialised, whichever xcli.crosscoder.fmx.FmxCrosscoder.contracts finds cheaper); `fmx-materialised`,
both tensors materialised every step (what every fmx step did before); `fmx-contracted`, both
contracted.

    python benchmarks/fmx_step_speed.py --threads 1 --layers 6 --d 384 --latents 4096 --k 32 --batch 1024
"""

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.train_speed import interleaved_times  # noqa: E402
from xcli.crosscoder.fmx import FmxCrosscoder
from xcli.crosscoder.model import Crosscoder
from xcli.source import Source
from xcli.train import loop as tr

FORCED = {"fmx": None, "fmx-materialised": (), "fmx-contracted": ("enc", "dec")}


def make_step(variant: str, sources: list[Source], args, x: dict[str, torch.Tensor]):
    if variant == "acausal":
        model = Crosscoder(sources, args.latents, "batchtopk", args.k)
    else:
        model = FmxCrosscoder(sources, args.latents, "batchtopk", args.k, ranks=args.ranks)
        model.contracted_parts = FORCED[variant]
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = tr.TrainConfig(stores=("-",), output="-", arch="batchtopk" if variant == "acausal" else "fmx",
                         latents=args.latents, k=args.k, batch_size=args.batch, steps=10 ** 9, warmup=0, lr=1e-4,
                         k_aux=min(tr.K_AUX_MAX, len(sources) * args.d // 2), dead_tokens=10 ** 9, mask_prob=0.0,
                         dtype="float32", device="cpu")
    state = tr.TrainState(since_fired=torch.zeros(args.latents, dtype=torch.int64))
    opt = tr.make_optimizer(model, cfg.lr)
    dead = torch.arange(args.latents) < round(args.dead * args.latents)

    def step():
        state.since_fired[dead] = cfg.dead_tokens  # the same latents count as dead at every step: AuxK acts
        tr.train_step(model, opt, x, state, cfg, None)
    return model, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--latents", type=int, default=512)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--ranks", type=lambda s: tuple(int(r) for r in s.split(",")), default=None,
                        help="tr ranks R1,R2,R3 (default: xc's, ceil(sqrt(L*d)) each)")
    parser.add_argument("--dead", type=float, default=0.0,
                        help="the share of latents that count as dead at every step (AuxK reconstructs the residual "
                             "from them, k_aux = min(512, L*d/2)); default 0: no AuxK")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default="acausal,fmx",
                        help="comma-separated: acausal, fmx, fmx-materialised, fmx-contracted")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tr.keep_freed_memory()  # as `xc train` does on CPU
    sources = [Source(f"l{j}", "m", "resid_post", j, args.d) for j in range(args.layers)]
    x = torch.randn(args.batch, args.layers, args.d, generator=torch.Generator().manual_seed(1))
    x = {f"l{j}": x[:, j].contiguous() for j in range(args.layers)}
    variants = args.variants.split(",")
    steps = {}
    for v in variants:
        model, steps[v] = make_step(v, sources, args, x)
        if isinstance(model, FmxCrosscoder):
            contracted = [p for p in ("enc", "dec") if model.contracts(p, args.batch)]
            print(f"# {v}: ranks {','.join(map(str, model.ranks))}, rank R = {model.enc.rank}, contracts "
                  f"{', '.join(contracted) or 'nothing'}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.layers} layers x d={args.d}, F={args.latents}, k={args.k}, batch {args.batch}, "
          f"{args.dead:.0%} dead; "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    times = interleaved_times(steps, args.repeats, args.steps)
    for v in variants:
        line = f"{v:18s} {statistics.median(times[v]) * 1e3:8.0f} ms/step"
        if v != "acausal" and "acausal" in times:
            ratio = statistics.median(t / a for t, a in zip(times[v], times["acausal"]))
            line += f"   {ratio:.2f}x acausal"
        print(line)


if __name__ == "__main__":
    main()
