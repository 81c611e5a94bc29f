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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loader_speed import epoch_speed, overlap_speed, train_rig, trainer_speed, write_store  # noqa: E402

from xcli import remote  # noqa: E402
from xcli.data import loader as ld  # noqa: E402
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

    rig = train_rig(streams["local"], args)

    results = {key: [] for key in (*streams, "trainer", "overlap", "wait", "first")}
    for _ in range(args.repeats):
        for key, s in streams.items():
            results[key].append(epoch_speed(s))
        results["trainer"].append(trainer_speed(rig))
        speed, wait, first = overlap_speed(stream, rig)
        results["overlap"].append(speed)
        results["wait"].append(wait)
        results["first"].append(first)
    server.kill()
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"# {args.tokens} rows, {args.sources} sources x d={args.d} float16, chunks of "
          f"{stream.stores.chunk_rows} rows, shuffle buffer {args.shuffle_buffer}, batch {args.batch}, "
          f"F={args.latents}, k={args.k}, dtype {rig.cfg.dtype}, {args.threads} threads, "
          f"{ld.REMOTE_PARALLEL_READS} parallel reads, {args.latency_ms:g} ms per request; medians of {args.repeats}")
    print(f"# writing the store: local {args.tokens / local_write:,.0f} tok/s, s3 {args.tokens / s3_write:,.0f} tok/s")
    print("what | tokens/s | MB/s (as stored) | vs local")
    for key in (*streams, "trainer", "overlap"):
        print(f"{key} | {med[key]:,.0f} | {med[key] * bytes_per_token / 1e6:,.1f} | {med[key] / med['local']:.3f}")
    print(f"overlap from s3: waited for batches {100 * med['wait']:.1f}% of the loop; first shuffle window "
          f"{med['first'] * 1000:,.0f} ms")


if __name__ == "__main__":
    main()
