"""Activation-store layout: bytes/token and write/read speed per chunk size and codec.

    python benchmarks/store_codecs.py [--rows 32768] [--d 768] [--sources 2] [--repeats 3]

Writes the same rows through xcli.data.store.StoreWriter for every combination of
chunk rows (1024, 4096, 16384), codec (none, zstd, blosc-lz4) and storage dtype
(float16, bfloat16), then reads them back chunk by chunk with read_chunk (the
sequential pattern training uses; the page cache is warm, so reads measure
decoding and zarr overhead, not the disk). The rows are Gaussian with a few
large outlier dimensions, like residual streams. Combinations are interleaved
and repeated; medians are printed. MB are of the raw (uncompressed) rows.
"""

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from xcli import files
from xcli.data import store as st

CHUNK_ROWS = (1024, 4096, 16384)
DTYPES = ("float16", "bfloat16")


def activations(rows: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = np.ones(d, dtype=np.float32)
    scale[rng.choice(d, size=max(1, d // 100), replace=False)] = 30.0  # outlier dimensions
    return (rng.standard_normal((rows, d), dtype=np.float32) * scale).astype(np.float32)


def one_run(root: Path, data: dict, chunk_rows: int, codec: str, dtype: str, batch: int = 1024):
    path = root / f"{chunk_rows}-{codec}-{dtype}.zarr"
    sources = [st.Source(name=name, model="m", site="resid_post", layer=i, d=x.shape[1])
               for i, (name, x) in enumerate(data.items())]
    rows = next(iter(data.values())).shape[0]
    encoded = {n: (st.float32_to_bf16_bits(x) if dtype == "bfloat16" else x.astype(np.float16))
               for n, x in data.items()}  # as harvest hands them over: already in the storage dtype
    start = time.perf_counter()
    writer = st.StoreWriter(path, sources, dtype=dtype, chunk_rows=chunk_rows, codec=codec)
    for lo in range(0, rows, batch):
        writer.append({n: x[lo:lo + batch] for n, x in encoded.items()}, tokens=np.arange(lo, lo + batch))
    writer.close()
    write_s = time.perf_counter() - start

    store = st.open_store(path)
    start = time.perf_counter()
    for i in range(store.n_chunks):
        store.read_chunk(i)
    read_s = time.perf_counter() - start
    acts_bytes = sum(p.stat().st_size for p in (path / "acts").rglob("*") if p.is_file())
    files.remove(path)
    raw = rows * sum(x.shape[1] for x in data.values()) * 2
    return {"bytes_per_token": acts_bytes / rows, "write": raw / write_s / 1e6, "read": raw / read_s / 1e6}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = {f"m.resid_post.{i}": activations(args.rows, args.d, i) for i in range(args.sources)}
    combos = list(itertools.product(CHUNK_ROWS, st.CODECS, DTYPES))
    results = {c: [] for c in combos}
    root = Path(tempfile.mkdtemp(prefix="xc-codecs-"))
    try:
        for repeat in range(args.repeats):
            order = combos if repeat % 2 == 0 else combos[::-1]  # interleave, alternating direction
            for combo in order:
                results[combo].append(one_run(root, data, *combo))
    finally:
        files.remove(root)
    print(f"{args.rows} rows x {args.sources} sources x d={args.d}; medians of {args.repeats}; "
          f"raw = {args.d * 2 * args.sources} bytes/token")
    print("| chunk rows | codec | dtype | bytes/token | ratio | write MB/s | read MB/s |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for combo in combos:
        med = {k: statistics.median(r[k] for r in results[combo]) for k in ("bytes_per_token", "write", "read")}
        ratio = args.d * 2 * args.sources / med["bytes_per_token"]
        print(f"| {combo[0]} | {combo[1]} | {combo[2]} | {med['bytes_per_token']:.0f} | {ratio:.2f} | "
              f"{med['write']:.0f} | {med['read']:.0f} |")


if __name__ == "__main__":
    main()
