"""Train-step speed of xc against a plain dense PyTorch crosscoder of the same shapes.

The baseline is written the way public crosscoder code writes it (ckkissane's
replication, dictionary_learning's BatchTopKCrossCoder): dense einsum encoder and
decoder, selection by f · decoder norm, autograd, torch.optim.Adam with its
defaults. xc runs its real training step (xcli.train.loop.train_step: sparse path,
gradient clipping, fused Adam, dead-latent counters, BatchTopK threshold).

Variants run interleaved, `--steps` steps each per repeat, after a warm-up; the
figures are medians over repeats, and ratios are taken within a repeat (this CPU
is shared, so only same-run ratios mean anything).

    python benchmarks/train_speed.py [--threads 2] [--repeats 5] [--steps 3] [--arch topk,batchtopk]
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli.crosscoder import sparse
from xcli.crosscoder.model import Crosscoder  # noqa: E402
from xcli.source import Source  # noqa: E402
from xcli.train import loop as tr  # noqa: E402


class DenseCrosscoder(torch.nn.Module):
    """The public-implementation baseline: W_enc (S, d, F), W_dec (F, S, d), einsums, dense autograd."""

    def __init__(self, n_sources: int, d: int, n_latents: int, arch: str, k: int):
        super().__init__()
        self.arch, self.k = arch, k
        self.W_enc = torch.nn.Parameter(torch.randn(n_sources, d, n_latents) * 0.01)
        self.W_dec = torch.nn.Parameter(torch.randn(n_latents, n_sources, d) * 0.01)
        self.b_enc = torch.nn.Parameter(torch.zeros(n_latents))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_sources, d))

    def forward(self, x):  # x: (B, S, d)
        f = torch.relu(torch.einsum("bsd,sdf->bf", x, self.W_enc) + self.b_enc)
        score = f * self.W_dec.norm(dim=2).sum(dim=1)
        if self.arch == "topk":
            idx = score.topk(self.k, dim=-1).indices
            f = torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))
        else:
            flat = score.flatten()
            keep = torch.zeros_like(flat).scatter(0, flat.topk(self.k * x.shape[0]).indices, 1.0)
            f = f * keep.view_as(f)
        return torch.einsum("bf,fsd->bsd", f, self.W_dec) + self.b_dec


def baseline_step(model, opt, x, autocast_bf16):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
        recon = model(x)
    loss = (recon.float() - x).pow(2).sum() / x.shape[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def make_xc(args, arch, d, dtype):
    sources = [Source(f"s{i}", f"m{i}", "resid_post", 0, d) for i in range(args.sources)]
    model = Crosscoder(sources, args.latents, arch, args.k)
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = tr.TrainConfig(stores=("-",), output="-", arch=arch, latents=args.latents, k=args.k,
                         batch_size=args.batch, steps=10 ** 9, warmup=0, lr=1e-4, k_aux=d, dead_tokens=10 ** 9,
                         dtype=dtype, device="cpu")
    state = tr.TrainState(since_fired=torch.zeros(args.latents, dtype=torch.int64))
    return model, tr.make_optimizer(model, cfg.lr), cfg, state


def interleaved_times(runners: dict, repeats: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each runner, one figure per repeat, after one warm-up call each. The
    runners take turns within every repeat, so a ratio taken within a repeat sees the same load."""
    for run in runners.values():  # warm-up (allocator, oneDNN primitives)
        run()
    times = {v: [] for v in runners}
    for _ in range(repeats):
        for v, run in runners.items():
            started = time.perf_counter()
            for _ in range(steps):
                run()
            times[v].append((time.perf_counter() - started) / steps)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--arch", default="topk,batchtopk")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", default="dense,dense-bf16,xc-fp32,xc-bf16",
                        help="comma-separated: dense, dense-bf16, xc-fp32, xc-bf16, xc-bf16-dense-egrad")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's defaults (xc train tunes them on CPU; see xcli.train.loop.keep_freed_memory)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not args.system_malloc:
        tr.keep_freed_memory()  # as `xc train` does on CPU; it speeds up both sides
    variants = args.variants.split(",")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.sources} sources x d={args.d}, F={args.latents}, k={args.k}, batch {args.batch}; "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    x = torch.randn(args.batch, args.sources, args.d)
    x_by_source = {f"s{i}": x[:, i].contiguous() for i in range(args.sources)}
    for arch in args.arch.split(","):
        runners = {}
        for v in variants:
            if v.startswith("dense"):
                model = DenseCrosscoder(args.sources, args.d, args.latents, arch, args.k)
                opt = torch.optim.Adam(model.parameters(), lr=1e-4)
                runners[v] = (lambda m=model, o=opt, bf=v.endswith("bf16"): baseline_step(m, o, x, bf))
            else:
                dtype = "float32" if v == "xc-fp32" else "bfloat16"
                model, opt, cfg, state = make_xc(args, arch, args.d, dtype)
                egrad = "dense" if v.endswith("dense-egrad") else "sparse"

                def run(m=model, o=opt, c=cfg, s=state, e=egrad):
                    sparse.ENCODER_GRAD = e
                    tr.train_step(m, o, x_by_source, s, c, None)
                runners[v] = run
        times = interleaved_times(runners, args.repeats, args.steps)
        base = times[variants[0]]
        print(f"\n{arch}: variant | median ms/step | tokens/s | speed-up vs {variants[0]} (median of per-repeat ratios)")
        for v in variants:
            ratios = [b / t for b, t in zip(base, times[v])]
            print(f"{arch} | {v} | {statistics.median(times[v]) * 1e3:.0f} | "
                  f"{args.batch / statistics.median(times[v]):,.0f} | {statistics.median(ratios):.2f}x "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
