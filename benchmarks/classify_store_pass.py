"""Throughput and peak memory of `xc classify --store` (the one streaming pass).

A random two-model TopK crosscoder (F latents, k = 32, width D per model) over a
random float16 store of N tokens. Each setting of the batch budget runs in its own
subprocess, so peak RSS (ru_maxrss) is that run's; settings are interleaved over
repeats. Also prints what a (tokens x F) float32 array of latents would take, the
thing the pass never builds.

    python benchmarks/classify_store_pass.py [--latents 65536] [--width 64] [--tokens 4096]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, F: int, D: int, N: int) -> None:
    import numpy as np
    import torch

    from xcli.crosscoder.model import Crosscoder, save
    from xcli.data.store import StoreWriter
    from xcli.source import Source

    sources = [Source(f"{m}.resid_post.6", m, "resid_post", 6, D) for m in ("base", "chat")]
    model = Crosscoder(sources, F, "topk", k=32)
    model.init_weights(torch.Generator().manual_seed(0), decoder_norm=0.1)
    save(model, folder / "xc.safetensors")
    rng = np.random.default_rng(0)
    writer = StoreWriter(folder / "acts.zarr", sources, dtype="float16", chunk_rows=4096)
    for start in range(0, N, 4096):
        rows = min(4096, N - start)
        writer.append({s.name: rng.normal(size=(rows, D)).astype(np.float32) for s in sources})
    writer.close()


def one_run(folder: Path, batch_elements: int, device: str) -> dict:
    import torch

    import xcli
    from xcli.analysis import classify as cl
    from xcli.data.store import open_store

    torch.set_num_threads(2)
    model = xcli.load(folder / "xc.safetensors")
    store = open_store(folder / "acts.zarr")
    start = time.perf_counter()
    result = cl.classify(model, store, cl.ClassifyConfig(batch_elements=batch_elements, device=device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": store.n_tokens / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "classes": result.summary()["classes"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", type=int, default=65536)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--budgets", default="1048576,4194304,16777216", help="batch_elements settings")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_run(Path(args.child[0]), int(args.child[1]), args.child[2])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, args.latents, args.width, args.tokens)
        dense_mib = args.tokens * args.latents * 4 / 2**20
        print(f"F={args.latents} D={args.width} per model, {args.tokens} tokens; "
              f"a dense (tokens x F) float32 latent array would be {dense_mib:.0f} MiB")
        budgets = [int(b) for b in args.budgets.split(",")]
        results = {b: [] for b in budgets}
        for _ in range(args.repeats):
            for b in budgets:  # interleaved, so drift in machine load hits every setting
                out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(b), args.device],
                                     check=True, capture_output=True, text=True)
                results[b].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for b in budgets:
            runs = results[b]
            rows = max(1, b // args.latents)
            best = min(r["seconds"] for r in runs)
            print(f"batch_elements={b:>9} ({rows:>4} tokens/batch): best {best:6.2f} s, "
                  f"{args.tokens / best:8.0f} tokens/s, peak RSS {max(r['peak_rss_mib'] for r in runs):6.0f} MiB")


if __name__ == "__main__":
    main()
