"""Store read throughput against what the trainer consumes, at the train-speed shapes.

Writes a synthetic store (2 sources x d=512 by default, float16, 4096-row chunks),
then, interleaved over repeats:

  chunks   read every training chunk in store order, as stored (the Zarr read alone)
  loader   the training batch stream (shuffle window, batch assembly), synchronous
  trainer  xc train steps on batches already in memory (what the step consumes)
  overlap  the real loop: the prefetching loader thread feeding train steps; the time the
           step waits for a batch (after the first shuffle window is in) is what the loader
           costs the trainer

and prints medians. The loader keeps up when its tokens/s exceed the trainer's and the
waits stay near zero.

    python benchmarks/loader_speed.py [--tokens 131072] [--repeats 3] [--threads 2] [--codec none]
"""

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli.crosscoder.model import Crosscoder  # noqa: E402
from xcli.data.loader import BatchStream, StoreSet, train_eval_chunks  # noqa: E402
from xcli.data.store import StoreWriter  # noqa: E402
from xcli.source import Source  # noqa: E402
from xcli.train import loop as tr  # noqa: E402


def write_store(path, args, codec: str = "none") -> None:
    """args.tokens rows of args.sources sources x d=args.d, float16, at `path` (a folder or a URL)."""
    sources = [Source(f"m{i}.resid_post.6", f"m{i}", "resid_post", 6, args.d) for i in range(args.sources)]
    writer = StoreWriter(path, sources, dtype="float16", codec=codec)
    rng = np.random.default_rng(0)
    for start in range(0, args.tokens, 16384):
        rows = min(16384, args.tokens - start)
        writer.append({s.name: rng.standard_normal((rows, args.d), dtype=np.float32) for s in sources},
                      tokens=np.zeros(rows, dtype=np.int64))
    writer.close()


# -- the measurements, shared with object_store_loader.py -----------------------------------------

@dataclass
class Rig:
    """An xc train step at the benchmark's shapes, with two batches in memory to feed it."""

    model: Crosscoder
    cfg: tr.TrainConfig
    opt: torch.optim.Optimizer
    state: tr.TrainState
    in_memory: list
    steps: int
    batch: int

    def step(self, batch) -> None:
        tr.train_step(self.model, self.opt, batch, self.state, self.cfg, None)


def train_rig(stream: BatchStream, args) -> Rig:
    """batchtopk, F=args.latents, k=args.k on stream's stores; args.steps steps per measurement."""
    model = Crosscoder(stream.stores.sources, args.latents, "batchtopk", args.k)
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = tr.resolve(tr.TrainConfig(stores=tuple(str(s.path) for s in stream.stores.stores), output="-",
                                    latents=args.latents, k=args.k, batch_size=args.batch, steps=10 ** 9, warmup=0,
                                    lr=1e-4, dead_tokens=10 ** 9, device="cpu", eval_fraction=0.0), stream.stores)
    rig = Rig(model, cfg, tr.make_optimizer(model, cfg.lr),
              tr.TrainState(since_fired=torch.zeros(args.latents, dtype=torch.int64)), [], args.steps, args.batch)
    batches = stream.batches()
    rig.in_memory = [{n: t.float() for n, t in next(batches).data.items()} for _ in range(2)]
    rig.step(rig.in_memory[0])  # warm-up
    return rig


def epoch_speed(stream: BatchStream) -> float:
    """Tokens/s of one epoch of the training batch stream, synchronous."""
    started, rows = time.perf_counter(), 0
    for batch in stream.batches():
        rows += batch.rows
        if batch.after.epoch == 1:
            break
    return rows / (time.perf_counter() - started)


def trainer_speed(rig: Rig) -> float:
    """Tokens/s of train steps on batches already in memory: what the step consumes."""
    started = time.perf_counter()
    for i in range(rig.steps):
        rig.step(rig.in_memory[i % 2])
    return rig.steps * rig.batch / (time.perf_counter() - started)


def overlap_speed(stream: BatchStream, rig: Rig) -> tuple[float, float, float]:
    """The real loop, the prefetching loader thread feeding train steps: (tokens/s, the fraction of the time
    spent waiting for a batch, the seconds to the first batch). The clock starts once the first shuffle
    window is in (a one-off latency)."""
    with stream.prefetched() as prefetched:
        asked = time.perf_counter()
        batch = next(prefetched)
        first = time.perf_counter() - asked
        waited, started = 0.0, time.perf_counter()
        for step in range(rig.steps):
            if step:
                asked = time.perf_counter()
                batch = next(prefetched)
                waited += time.perf_counter() - asked
            rig.step({n: t.float() for n, t in batch.data.items()})
    total = time.perf_counter() - started
    return rig.steps * rig.batch / total, waited / total, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--shuffle-buffer", type=int, default=65536)
    parser.add_argument("--codec", default="none", choices=["none", "zstd", "blosc-lz4"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="train steps per trainer/overlap measurement")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tr.keep_freed_memory()  # as xc train does on CPU

    work = args.dir or Path(tempfile.mkdtemp(prefix="xc-loader-"))
    store = work / f"store-{args.codec}.zarr"
    if not store.exists():
        write_store(store, args, args.codec)
    stores = StoreSet([store])
    names = stores.names
    train_chunks, _ = train_eval_chunks(stores.n_chunks, 0.0)
    stream = BatchStream(stores, names, train_chunks, args.batch, seed=0, shuffle_rows=args.shuffle_buffer)
    bytes_per_token = sum(s.d for s in stores.sources) * 2  # as stored (float16)
    rig = train_rig(stream, args)

    def chunks():
        started = time.perf_counter()
        for c in train_chunks:
            stores.read_chunk_stored(int(c), names)
        return stream.rows_per_epoch / (time.perf_counter() - started)

    results = {"chunks": [], "loader": [], "trainer": [], "overlap": [], "wait": [], "first": []}
    for _ in range(args.repeats):
        results["chunks"].append(chunks())
        results["loader"].append(epoch_speed(stream))
        results["trainer"].append(trainer_speed(rig))
        speed, wait, first = overlap_speed(stream, rig)
        results["overlap"].append(speed)
        results["wait"].append(wait)
        results["first"].append(first)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"# {args.tokens} rows, {args.sources} sources x d={args.d} float16, codec {args.codec}, "
          f"chunks of {stores.chunk_rows} rows, shuffle buffer {args.shuffle_buffer}, batch {args.batch}, "
          f"F={args.latents}, k={args.k}, dtype {rig.cfg.dtype}, {args.threads} threads; medians of {args.repeats}")
    print("what | tokens/s | MB/s (as stored)")
    for key in ("chunks", "loader", "trainer", "overlap"):
        print(f"{key} | {med[key]:,.0f} | {med[key] * bytes_per_token / 1e6:,.1f}")
    print(f"loader / trainer = {med['loader'] / med['trainer']:.1f}x; after the first shuffle window "
          f"({med['first'] * 1e3:.0f} ms), the training loop waited for batches {100 * med['wait']:.1f}% of its time")


if __name__ == "__main__":
    main()
