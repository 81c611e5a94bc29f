"""GPU training speed of xc: tokens/s, fraction of bf16 peak, where the time goes.

Times xc's real training step (`xcli.train.loop.train_step`: sparse path, bf16 encoder matmul, gradient
clipping, fused Adam, dead-latent counters, BatchTopK threshold) on random activations already on
the device, for 2 sources x d = 2304 (Gemma-2-2B width, D = 4608), F in {16384, 32768, 65536},
k = 100, batches of 4096 to 32768 tokens, with the Triton kernels (xcli/kernels.py) and without
(XC_DISABLE_TRITON=1: PyTorch's embedding_bag and sampled_addmm), interleaved.

FLOPs counted per token: 2·D·F (encoder matmul) + 8·k·D (the sparse decoder forward 2·k·D, and in
the backward dW_dec 2·k·D, dv 2·k·D, dW_enc 2·k·D), k the nominal k. Not counted: the selection,
the loss, gradient clipping, Adam (memory-bound), the encoder's db_enc. AuxK does not run (no latent
is dead within the run). "% peak" divides by the dense bf16 peak of the GPU (table below, or
--peak-tflops); "GEMM alone" is the TFLOP/s of the bare (B x D) @ (D x F) bf16 matmul, the ceiling
the step's main cost can reach on this GPU.

The split of step time comes from torch.profiler: device (kernel) time under each part, as a share
of the whole step's (on CPU, CPU time): encoder (the matmul), selection (top-k / BatchTopK),
decode (both sparse decodes, forward), backward (autograd: all gradients), optimizer (Adam), other
(scores, loss, clipping, counters).

    python benchmarks/train_gpu.py                     # on a GPU, the full sweep
    python benchmarks/train_gpu.py --device cpu --quick  # tiny shapes: checks the script runs
    python benchmarks/train_gpu.py --json speed.json   # also every figure as JSON (gpu_check.py)
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli.crosscoder import sparse
from xcli.crosscoder.model import Crosscoder  # noqa: E402
from xcli.source import Source  # noqa: E402
from xcli.train import loop as tr  # noqa: E402

PEAK_BF16_TFLOPS = {  # dense (no 2:4 sparsity), NVIDIA's figures; matched against the device name
    "H100 PCIe": 756, "H100": 989, "H200": 989, "GH200": 989, "A100": 312,
}
PARTS = ("encoder", "selection", "decode", "backward", "optimizer")


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override or device.type != "cuda":
        return override
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS.items() if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def triton(enabled: bool):
    before = os.environ.get("XC_DISABLE_TRITON", "0")
    os.environ["XC_DISABLE_TRITON"] = "0" if enabled else "1"
    try:
        yield
    finally:
        os.environ["XC_DISABLE_TRITON"] = before


def labelled(name, fn):
    def run(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)
    return run


@contextmanager
def labelled_parts(opt):
    """Names the parts of the step for the profiler, without touching the library's code."""
    saved = {n: getattr(sparse, n) for n in ("encoder_matmul", "select_topk", "select_batchtopk", "decode")}
    backward, step = torch.Tensor.backward, opt.step
    sparse.encoder_matmul = labelled("encoder", saved["encoder_matmul"])
    sparse.select_topk = labelled("selection", saved["select_topk"])
    sparse.select_batchtopk = labelled("selection", saved["select_batchtopk"])
    sparse.decode = labelled("decode", saved["decode"])
    torch.Tensor.backward = labelled("backward", backward)
    opt.step = labelled("optimizer", step)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(sparse, n, fn)
        torch.Tensor.backward = backward
        del opt.step


def make(args, n_latents, batch, device):
    sources = [Source(f"s{i}", f"m{i}", "resid_post", 0, args.d) for i in range(args.sources)]
    model = Crosscoder(sources, n_latents, args.arch, args.k)
    model.init_weights(torch.Generator().manual_seed(0))
    model.to(device)
    cfg = tr.TrainConfig(stores=("-",), output="-", arch=args.arch, latents=n_latents, k=args.k,
                         batch_size=batch, steps=10 ** 9, warmup=0, lr=1e-4, k_aux=args.d, dead_tokens=10 ** 12,
                         dtype=args.dtype, device=str(device))
    state = tr.TrainState(since_fired=torch.zeros(n_latents, dtype=torch.int64, device=device))
    opt = tr.make_optimizer(model, cfg.lr)
    return model, opt, cfg, state


def gemm_tflops(batch, d_in, n_latents, device, dtype, repeats=5):
    a = torch.randn(batch, d_in, device=device, dtype=dtype)
    b = torch.randn(d_in, n_latents, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * batch * d_in * n_latents * repeats / (time.perf_counter() - started) / 1e12


def profile_split(step, opt, device, steps=3):
    """{part: seconds per step}, "step", and "kernels": all kernel time (the step's share of it shows
    whether every kernel, Triton's included, was attributed), from the profiler's per-range times."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with labelled_parts(opt), profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function("step"):
                step()
        synchronize(device)
    totals = dict.fromkeys(PARTS + ("step", "kernels"), 0.0)
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            if event.name not in totals:
                totals["kernels"] += event.device_time_total
        elif event.name in totals:  # device_time_total: kernels launched within the range, children included
            totals[event.name] += event.device_time_total if device.type == "cuda" else event.cpu_time_total
    return {name: us / steps / 1e6 for name, us in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (2 x 64, F 512/1024, k 8): checks the script")
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--latents", default="16384,32768,65536")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--batches", default="4096,8192,16384,32768")
    parser.add_argument("--arch", default="batchtopk", choices=["topk", "batchtopk"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--variants", default="triton,pytorch", help="triton and/or pytorch (XC_DISABLE_TRITON=1)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the device, TFLOP/s")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    args = parser.parse_args()
    if args.quick:  # new defaults; options given still win
        parser.set_defaults(d=64, latents="512,1024", k=8, batches="256,512", steps=2, repeats=2)
        args = parser.parse_args()
    device = torch.device(args.device)
    variants = args.variants.split(",")
    if device.type != "cuda" and "triton" in variants:
        print("# no CUDA device: the Triton kernels do not run; timing the PyTorch path only", file=sys.stderr)
        variants = [v for v in variants if v != "triton"] or ["pytorch"]
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    try:
        import triton as triton_module
        triton_version = triton_module.__version__
    except ImportError:
        triton_version = "not installed"
    d_total = args.sources * args.d
    print(f"# {name}, torch {torch.__version__}, triton {triton_version}, {args.arch}, {args.dtype} matmul, "
          f"{args.sources} x d={args.d} (D={d_total}), k={args.k}; peak {peak or 'unknown'} TFLOP/s; "
          f"{args.steps} steps x {args.repeats} interleaved repeats")
    print("# FLOPs per token counted: 2*D*F + 8*k*D")
    speed, split = [], []
    for n_latents in map(int, args.latents.split(",")):
        for batch in map(int, args.batches.split(",")):
            model, opt, cfg, state = make(args, n_latents, batch, device)
            x = {f"s{i}": torch.randn(batch, args.d, device=device) for i in range(args.sources)}
            step = partial(tr.train_step, model, opt, x, state, cfg, None)
            times = {v: [] for v in variants}
            for v in variants:  # warm-up: compilation, allocator, cuBLAS heuristics
                with triton(v == "triton"):
                    step(), step()
            for _ in range(args.repeats):
                for v in variants:
                    with triton(v == "triton"):
                        synchronize(device)
                        started = time.perf_counter()
                        for _ in range(args.steps):
                            step()
                        synchronize(device)
                    times[v].append((time.perf_counter() - started) / args.steps)
            flops = batch * (2 * d_total * n_latents + 8 * args.k * d_total)
            gemm = gemm_tflops(batch, d_total, n_latents, device, getattr(torch, args.dtype))
            for v in variants:
                seconds = statistics.median(times[v])
                tflops = flops / seconds / 1e12
                speed.append((n_latents, batch, v, seconds * 1e3, batch / seconds, tflops,
                              f"{100 * tflops / peak:.1f}%" if peak else "n/a", gemm))
            if not args.no_profile:
                with triton(variants[0] == "triton"):
                    parts = profile_split(step, opt, device)
                split.append((n_latents, batch, variants[0], parts))
            del model, opt, x, state, step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.json:
        figures = {
            "device": name, "torch": torch.__version__, "triton": triton_version, "arch": args.arch,
            "dtype": args.dtype, "sources": args.sources, "d": args.d, "k": args.k, "peak_tflops": peak,
            "flops_per_token": "2*D*F + 8*k*D",
            "speed": [{"latents": f, "batch": b, "kernels": v, "ms_per_step": ms, "tokens_per_s": tps,
                       "tflops": tf, "fraction_of_peak": tf / peak if peak else None, "gemm_tflops": gemm}
                      for f, b, v, ms, tps, tf, _, gemm in speed],
            "split": [{"latents": f, "batch": b, "kernels": v, "seconds": parts} for f, b, v, parts in split],
        }
        Path(args.json).write_text(json.dumps(figures, indent=1))
    print("\n| F | batch | kernels | ms/step | tokens/s | TFLOP/s counted | % of bf16 peak | GEMM alone TFLOP/s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for f, b, v, ms, tps, tf, pct, gemm in speed:
        print(f"| {f} | {b} | {v} | {ms:.2f} | {tps:,.0f} | {tf:.3g} | {pct} | {gemm:.3g} |")
    if split:
        unit = "device" if device.type == "cuda" else "CPU"
        print(f"\nSplit of the step's {unit} time (torch.profiler, 3 steps), % of the step:")
        print("| F | batch | kernels | step ms | " + " | ".join(PARTS) + " | other |")
        print("|---:|---:|---|---:|" + "---:|" * (len(PARTS) + 1))
        for f, b, v, parts in split:
            total = parts["step"] or float("nan")
            shares = [100 * parts[p] / total for p in PARTS]
            print(f"| {f} | {b} | {v} | {total * 1e3:.2f} | " + " | ".join(f"{s:.1f}" for s in shares)
                  + f" | {100 - sum(shares):.1f} |")
        if device.type == "cuda":
            shares = [f"{100 * p['step'] / p['kernels']:.0f}%" for *_, p in split if p["kernels"]]
            print(f"(kernel time attributed to the steps: {', '.join(shares)}; "
                  "below 100%, some kernels ran outside a labelled range)")


if __name__ == "__main__":
    main()
