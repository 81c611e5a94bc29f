"""Training-batch throughput from a store in object storage against the same store on local disk.

Starts a local S3 server (moto's, on 127.0.0.1, in its own process) that answers every request after
--latency-ms (a cloud bucket's time to first byte is tens of milliseconds), writes one synthetic store at the train-speed shapes
(2 sources x d=512 float16, 4096-row chunks) to local disk and the same to s3://, then, interleaved
over repeats:

  local       the training batch stream (shuffle window, batch assembly) from local disk
  s3 serial   the same from S3, one chunk read at a time (what local disk does)
  s3 parallel the same from S3 with BatchStream's parallel reads (REMOTE_PARALLEL_READS chunks in flight)
  trainer     xc train steps (batchtopk, F=8192, k=32) on batches in memory: what the CPU trainer consumes
  overlap     the real loop from S3: the prefetching loader thread feeding train steps; `wait` is the
              fraction of the loop's time spent waiting for a batch once the first shuffle window is in

and prints medians. moto is a Python server on the loopback interface, sharing this machine's cores: its
bandwidth is far below a real bucket's, and the latency is simulated; the figures show the shape of the
gap (requests in flight hide latency), not what a given bucket delivers.

    python benchmarks/object_store_loader.py [--tokens 32768] [--latency-ms 20] [--repeats 3] [--threads 2]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli import remote  # noqa: E402
from xcli.crosscoder.model import Crosscoder  # noqa: E402
from xcli.data import loader as ld  # noqa: E402
from xcli.data.store import StoreWriter  # noqa: E402
from xcli.source import Source  # noqa: E402
from xcli.train import loop as tr  # noqa: E402

# moto's S3 server with a fixed delay before every answer, in its own process (not under this one's GIL).
SERVER = """
import sys, time
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server
app, delay = DomainDispatcherApplication(create_backend_app), float(sys.argv[1]) / 1000

def slow(environ, start_response):
    time.sleep(delay)
    return app(environ, start_response)

server = make_server("127.0.0.1", 0, slow, True, request_handler=MotoRequestHandler)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def write_store(path, args) -> None:
    sources = [Source(f"m{i}.resid_post.6", f"m{i}", "resid_post", 6, args.d) for i in range(args.sources)]
    writer = StoreWriter(path, sources, dtype="float16")
    rng = np.random.default_rng(0)
    for start in range(0, args.tokens, 16384):
        rows = min(16384, args.tokens - start)
        writer.append({s.name: rng.standard_normal((rows, args.d), dtype=np.float32) for s in sources},
                      tokens=np.zeros(rows, dtype=np.int64))
    writer.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--sources", type=int, default=2)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--shuffle-buffer", type=int, default=65536)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="train steps per trainer/overlap measurement")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tr.keep_freed_memory()

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ[key] = "benchmark"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(args.latency_ms)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    remote.configure({"endpoint_url": f"http://127.0.0.1:{int(server.stdout.readline())}"})
    remote.filesystem("s3").mkdir("bench")
    local, url = Path(tempfile.mkdtemp(prefix="xc-s3-bench-")) / "store.zarr", "s3://bench/store.zarr"
    started = time.perf_counter()
    write_store(local, args)
    local_write = time.perf_counter() - started
    started = time.perf_counter()
    write_store(url, args)
    s3_write = time.perf_counter() - started

    def stream_of(path, parallel=None):
        stores = ld.StoreSet([path])
        train_chunks, _ = ld.train_eval_chunks(stores.n_chunks, 0.0)
        stream = ld.BatchStream(stores, stores.names, train_chunks, args.batch, seed=0,
                                shuffle_rows=args.shuffle_buffer)
        if parallel is not None:
            stream.parallel_reads = parallel
        return stream

    streams = {"local": stream_of(local), "s3 serial": stream_of(url, 1), "s3 parallel": stream_of(url)}
    stream = streams["s3 parallel"]
    bytes_per_token = sum(s.d for s in stream.stores.sources) * 2

    model = Crosscoder(stream.stores.sources, args.latents, "batchtopk", args.k)
    model.init_weights(torch.Generator().manual_seed(0))
    cfg = tr.resolve(tr.TrainConfig(stores=(str(local),), output="-", latents=args.latents, k=args.k,
                                    batch_size=args.batch, steps=10 ** 9, warmup=0, lr=1e-4,
                                    dead_tokens=10 ** 9, device="cpu", eval_fraction=0.0), stream.stores)
    opt = tr.make_optimizer(model, cfg.lr)
    state = tr.TrainState(since_fired=torch.zeros(args.latents, dtype=torch.int64))
    batches = streams["local"].batches()
    in_memory = [{n: t.float() for n, t in next(batches).data.items()} for _ in range(2)]
    tr.train_step(model, opt, in_memory[0], state, cfg, None)  # warm-up

    def epoch(s):
        started, rows = time.perf_counter(), 0
        for batch in s.batches():
            rows += batch.rows
            if batch.after.epoch == 1:
                break
        return rows / (time.perf_counter() - started)

    def trainer():
        started = time.perf_counter()
        for i in range(args.steps):
            tr.train_step(model, opt, in_memory[i % 2], state, cfg, None)
        return args.steps * args.batch / (time.perf_counter() - started)

    def overlap():
        with stream.prefetched() as prefetched:
            asked = time.perf_counter()
            batch = next(prefetched)
            first = time.perf_counter() - asked
            waited, started = 0.0, time.perf_counter()
            for step in range(args.steps):
                if step:
                    asked = time.perf_counter()
                    batch = next(prefetched)
                    waited += time.perf_counter() - asked
                tr.train_step(model, opt, {n: t.float() for n, t in batch.data.items()}, state, cfg, None)
        total = time.perf_counter() - started
        return args.steps * args.batch / total, waited / total, first

    results = {key: [] for key in (*streams, "trainer", "overlap", "wait", "first")}
    for _ in range(args.repeats):
        for key, s in streams.items():
            results[key].append(epoch(s))
        results["trainer"].append(trainer())
        speed, wait, first = overlap()
        results["overlap"].append(speed)
        results["wait"].append(wait)
        results["first"].append(first)
    server.kill()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"# {args.tokens} rows, {args.sources} sources x d={args.d} float16, chunks of "
          f"{stream.stores.chunk_rows} rows, shuffle buffer {args.shuffle_buffer}, batch {args.batch}, "
          f"F={args.latents}, k={args.k}, dtype {cfg.dtype}, {args.threads} threads, "
          f"{ld.REMOTE_PARALLEL_READS} parallel reads, {args.latency_ms:g} ms per request; medians of {args.repeats}")
    print(f"# writing the store: local {args.tokens / local_write:,.0f} tok/s, s3 {args.tokens / s3_write:,.0f} tok/s")
    print("what | tokens/s | MB/s (as stored) | vs local")
    for key in (*streams, "trainer", "overlap"):
        print(f"{key} | {med[key]:,.0f} | {med[key] * bytes_per_token / 1e6:,.1f} | {med[key] / med['local']:.3f}")
    print(f"overlap from s3: waited for batches {100 * med['wait']:.1f}% of the loop; first shuffle window "
          f"{med['first'] * 1000:,.0f} ms")


if __name__ == "__main__":
    main()
