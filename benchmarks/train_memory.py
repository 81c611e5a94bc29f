"""Peak memory of `xc train` as the store grows: it must stay flat.

Writes two synthetic stores (two sources of width D, float16), one 10x the rows of
the other, then trains the same crosscoder for the same number of steps on each,
in fresh processes, alternating small and large. Peak RSS comes from os.wait4 on
each child. Prints one line per run and the ratio of the medians.

    python benchmarks/train_memory.py [--tokens 100000] [--repeats 2] [--dir /tmp/xc-bench]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli.data import synth  # noqa: E402


def run(store: Path, out: Path, args) -> dict:
    command = [sys.executable, "-m", "xcli", "train", str(store), "-o", str(out), "--overwrite", "--quiet",
               "--latents", str(args.latents), "--k", "32", "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--eval-fraction", "0.01", "--checkpoint-every", "1000000",
               "--log", str(out.with_suffix(".jsonl")), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"xc train failed on {store}")
    lines = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    speed = [r["tokens_per_s"] for r in lines if r["kind"] == "train"]
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": time.perf_counter() - started,
            "tokens_per_s": speed[-1] if speed else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="rows of the small store")
    parser.add_argument("--d", type=int, default=256, help="width of each of the two sources")
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where to write the stores (default: a temp dir)")
    args = parser.parse_args()

    work = args.dir or Path(tempfile.mkdtemp(prefix="xc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    stores = {}
    for label, rows in (("1x", args.tokens), ("10x", 10 * args.tokens)):
        stores[label] = work / f"store_{label}.zarr"
        if not stores[label].exists():
            synth.make_store(stores[label], n_tokens=rows, d=args.d, n_shared=64, n_exclusive=32, active=8,
                             chunk_rows=4096, dtype="float16", seed=0)
        size = sum(p.stat().st_size for p in stores[label].rglob("*") if p.is_file())
        print(f"store {label}: {rows} rows x 2 sources x d={args.d}, {size / 2**20:.0f} MiB on disk", flush=True)
    results = {"1x": [], "10x": []}
    for repeat in range(args.repeats):
        for label in ("1x", "10x"):  # interleaved, so drift on a shared machine hits both alike
            r = run(stores[label], work / f"xc_{label}.safetensors", args)
            results[label].append(r)
            print(f"run {repeat} {label}: peak RSS {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.1f} s, "
                  f"{r['tokens_per_s']:.0f} tokens/s", flush=True)
    small = statistics.median(r["peak_rss_mib"] for r in results["1x"])
    large = statistics.median(r["peak_rss_mib"] for r in results["10x"])
    print(f"median peak RSS: 1x {small:.0f} MiB, 10x {large:.0f} MiB, ratio {large / small:.3f}")


if __name__ == "__main__":
    main()
