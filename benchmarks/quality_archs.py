"""Quality on planted dictionaries: every architecture on the standard synthetic sets.

    python benchmarks/quality_archs.py [--jobs 2] [--dir /tmp/xc-quality] [--no-readme]

For each preset of `xc synth` (diff, layers, diff-layers; xcli.data.synth.PRESETS) it runs
the command line as a user would:

    xc synth PRESET -o STORE
    xc train STORE -o X.safetensors --arch ARCH ...        (relu, topk, batchtopk)
    xc eval X.safetensors STORE --truth STORE.truth.safetensors

with one protocol for all: F = 2 x the planted features, k = 4 (the expected number
of active features; topk and batchtopk), l1 = 2 (relu, the default), batch 512, lr 4e-3,
10 epochs of the 65,536-row store, 5% of the chunks held out (the metrics are on those).
Runs use one thread each, --jobs at a time. Prints one JSON line per run and the table,
and writes the table into benchmarks/README.md between the quality-archs-table markers.
(benchmarks/quality.py compares xc's default recipe with a plain reference trainer.)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xcli.data.synth import PRESETS  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from quality import write_readme  # noqa: E402

ARCHS = ("relu", "topk", "batchtopk")
BEGIN, END = "<!-- quality-archs-table:begin -->", "<!-- quality-archs-table:end -->"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def xc(*args) -> str:
    proc = subprocess.run([sys.executable, "-m", "xcli", *map(str, args), "--quiet"], env=ENV,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"xc {' '.join(map(str, args))} failed:\n{proc.stderr}")
    return proc.stdout


def run(preset: str, arch: str, store: Path, work: Path) -> dict:
    spec = PRESETS[preset]
    out = work / f"{preset}-{arch}.safetensors"
    sparsity = ["--k", "4"] if arch != "relu" else ["--l1", "2"]
    started = time.perf_counter()
    xc("train", store, "-o", out, "--overwrite", "--arch", arch, "--latents", 2 * spec.n_features, *sparsity,
       "--batch-size", 512, "--lr", 4e-3, "--tokens", 10 * spec.tokens, "--eval-fraction", 0.05,
       "--dead-tokens", 5000, "--shuffle-buffer", 16384, "--checkpoint-every", 1_000_000, "--device", "cpu")
    report = json.loads(xc("eval", out, store, "--truth", f"{store}.truth.safetensors", "--device", "cpu"))
    truth = report["truth"]
    return {"set": preset, "arch": arch, "fvu": report["fvu_total"], "l0": report["l0"],
            "dead": report["dead_fraction"], "mmcs": truth["mmcs"], "recovered": truth["recovered"],
            "by_span": {k: v["recovered"] for k, v in truth["by_span"].items()},
            "classification": (truth.get("classification") or {}).get("accuracy"),
            "seconds": time.perf_counter() - started}


def table(rows: list[dict]) -> str:
    lines = ["| set | arch | FVU | L0 | dead | MMCS | recovered | recovered by span (layers: fraction) | "
             "class accuracy |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        spans = " · ".join(f"{k}: {v:.2f}" for k, v in r["by_span"].items()) if len(r["by_span"]) > 1 else "—"
        accuracy = f"{r['classification']:.2f}" if r["classification"] is not None else "—"
        lines.append(f"| {r['set']} | {r['arch']} | {r['fvu']:.3f} | {r['l0']:.2f} | {r['dead']:.2f} | "
                     f"{r['mmcs']:.3f} | {r['recovered']:.2f} | {spans} | {accuracy} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--no-readme", action="store_true", help="print the table only")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="xc-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stores = {}
    for preset in PRESETS:
        stores[preset] = work / f"{preset}.zarr"
        xc("synth", preset, "-o", stores[preset], "--overwrite")
    jobs = [(p, a) for p in PRESETS for a in ARCHS]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run(*job, stores[job[0]], work), jobs))
    for row in rows:
        print(json.dumps(row))
    elapsed = time.perf_counter() - started
    text = (f"{table(rows)}\n\n`python benchmarks/quality_archs.py` ({len(rows)} runs, {args.jobs} at a time, one thread "
            f"each: {elapsed / 60:.1f} min on this machine's 2 shared CPU cores).")
    print(text)
    if not args.no_readme:
        write_readme(text, BEGIN, END)


if __name__ == "__main__":
    main()
