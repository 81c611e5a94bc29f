"""The whole GPU check in one call: CUDA tests, the training-speed sweep, a real run end to end,
and harvest against a bare forward pass. Every figure goes to OUT as JSON; a one-screen summary
goes to stdout.

    bash benchmarks/gpu_check.sh                      # on the device machine (sets up, then runs this)
    python benchmarks/gpu_check.py --out DIR          # the same, where xcli and its needs import
    python benchmarks/gpu_check.py --dry-run --out DIR   # every step on the CPU at tiny sizes (CI runs it)

Steps, each timed, each writing OUT/<step>.json with "ok", "seconds" and its figures. A step that
fails is recorded and the next one still runs, so one call returns as much as it can; the exit
status is 1 when any step failed.

    environment    torch, CUDA device, Triton, Python, xc version
    tests          the CUDA tests with the kernels compiled: tests/crosscoder/test_kernels.py,
                   tests/crosscoder/test_sparse.py and the CUDA classify test (pass/fail/skip counts;
                   a CUDA test that skips on a GPU counts as a failure)
    train_speed    benchmarks/train_gpu.py: 2 x 2304 sources (Gemma-2-2B width), F 16384/32768/65536,
                   k 100, batches 4096-32768, bf16; tokens/s, fraction of bf16 peak (FLOPs as that
                   script documents), Triton on and off, the bare matmul ceiling, the profiler's split
    end_to_end     `xc harvest` of a GPT-2-small-shaped model with random weights into a store, then
                   `xc train` from it on the GPU; tokens/s of both commands (start-up included), the
                   training's own tokens/s, held-out FVU, and the seconds the training loop waited
                   for the loader (loader_wait_s in the train log)
    harvest_speed  benchmarks/harvest_speed.py on the GPU: harvest time over a bare forward pass
                   (target <= 1.10x)
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # xc from this checkout: the device machine has it installed nowhere
STEPS = ("environment", "tests", "train_speed", "end_to_end", "harvest_speed")
CUDA_TESTS = ["tests/crosscoder/test_kernels.py", "tests/crosscoder/test_sparse.py",
              "tests/analysis/test_classify.py::test_cuda_pass_matches_cpu"]
HARVEST_TARGET = 1.10  # harvest time over a bare forward pass, on a GPU


def run(command: list[str], log: Path, timeout: float, env: dict | None = None) -> None:
    """Run a command with its output appended to `log`; raise with the log's tail if it fails."""
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})})
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{command[2] if len(command) > 2 else command[0]} exited {proc.returncode}:\n"
                           + "\n".join(tail))


def xc(*args) -> list[str]:
    return [sys.executable, "-m", "xcli", *map(str, args)]


# -- the steps -------------------------------------------------------------------------------------

def environment(args, work: Path) -> dict:
    import torch

    import xcli

    figures = {"python": platform.python_version(), "torch": torch.__version__, "xc": xcli.__version__,
               "cuda_available": torch.cuda.is_available(), "dry_run": args.dry_run}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        figures.update(device=props.name, capability=f"{props.major}.{props.minor}",
                       memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    elif not args.dry_run:
        raise RuntimeError("no CUDA device: run with --dry-run to check the script on the CPU")
    try:
        import triton
        figures["triton"] = triton.__version__
    except ImportError:
        figures["triton"] = None
    return figures


def tests(args, work: Path) -> dict:
    junit = work / "tests.xml"
    try:
        chosen = ["-k", "embedding_bag or cuda"] if args.dry_run else []  # the suite runs the rest on CPU
        run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}",
             *chosen, *CUDA_TESTS], work / "log.txt", args.timeout)
        failure = None
    except RuntimeError as e:
        failure = str(e)
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    skipped = [case.get("name") for case in suite.iter("testcase") if case.find("skipped") is not None]
    figures = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    figures["skipped_tests"] = skipped
    if failure:
        raise RuntimeError(failure)
    if not args.dry_run and skipped:
        raise RuntimeError(f"{len(skipped)} CUDA test(s) skipped on a GPU machine: {', '.join(skipped)}")
    return figures


def train_speed(args, work: Path) -> dict:
    out = work / "train_speed.json"
    options = ["--device", "cpu", "--quick", "--latents", "512", "--batches", "256"] if args.dry_run else []
    run([sys.executable, "benchmarks/train_gpu.py", *options, "--json", str(out)], work / "log.txt", args.timeout)
    figures = json.loads(out.read_text())
    best = max(figures["speed"], key=lambda row: row["tokens_per_s"])
    figures["best"] = best
    return figures


def end_to_end(args, work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from harvest_speed import build_model

    import tiny_models

    model = build_model(work, small=args.dry_run)
    corpus = work / "corpus.txt"
    tokens, batch = (4096, 512) if args.dry_run else (2 ** 19, 4096)
    corpus.write_text("\n".join(tiny_models.corpus_lines(tokens // 8, seed=2, min_words=20)) + "\n")
    device = "cpu" if args.dry_run else "cuda"
    store, checkpoint, log = work / "acts.zarr", work / "xc.safetensors", work / "train.jsonl"
    log_file = work / "log.txt"
    started = time.perf_counter()
    run(xc("harvest", "-q", "--model", f"gpt2={model}", "--layers", "0" if args.dry_run else "6", "--data", corpus,
           "--tokens", tokens, "--context-length", 256, "--batch-size", 16, "--chunk-rows", batch, "--device", device,
           "-o", store),
        log_file, args.timeout)
    harvest_seconds = time.perf_counter() - started
    started = time.perf_counter()
    run(xc("train", "-q", store, "-o", checkpoint, "--k", 32, "--expansion", 4 if args.dry_run else 16,
           "--batch-size", batch, "--device", device, "--log", log, "--log-every", 10, "--eval-fraction", 0.05),
        log_file, args.timeout)
    train_seconds = time.perf_counter() - started
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    train = [r for r in lines if r.get("kind") == "train"]
    evals = [r for r in lines if r.get("kind") == "eval"]
    waited = sum(r.get("loader_wait_s", 0.0) for r in train)
    return {"device": device, "tokens": tokens, "batch_size": batch, "harvest_seconds": harvest_seconds,
            "harvest_tokens_per_s": tokens / harvest_seconds, "train_seconds": train_seconds,
            "train_tokens_per_s": max((r["tokens_per_s"] for r in train), default=None),
            "steps": train[-1]["step"] if train else 0, "loader_wait_s": waited,
            "loader_made_the_gpu_wait": waited > 0.05 * train_seconds,
            "held_out_fvu": evals[-1].get("fvu_total") if evals else None}


def harvest_speed(args, work: Path) -> dict:
    out = work / "harvest_speed.json"
    options = ["--small", "--tokens", "512", "--repeats", "2"] if args.dry_run else \
        ["--device", "cuda", "--tokens", "65536", "--batch-size", "32", "--repeats", "7", "--dtype", "bfloat16"]
    run([sys.executable, "benchmarks/harvest_speed.py", *options, "--no-breakdown", "--json", str(out)],
        work / "log.txt", args.timeout)
    figures = json.loads(out.read_text())
    figures["target"] = HARVEST_TARGET
    figures["meets_target"] = figures["median_ratio"] <= HARVEST_TARGET
    return figures


# -- the call ------------------------------------------------------------------------------------------

def summary_lines(results: dict) -> list[str]:
    lines = [f"{'step':<14} {'ok':<5} {'seconds':>8}  figures"]
    for step, r in results.items():
        if not r["ok"]:
            said = "FAILED: " + r["error"].splitlines()[0][:100]
        elif step == "environment":
            said = f"{r.get('device', 'no GPU')}, torch {r['torch']}, triton {r['triton']}"
        elif step == "tests":
            said = f"{r['tests']} tests, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
        elif step == "train_speed":
            b = r["best"]
            peak = f", {100 * b['fraction_of_peak']:.1f}% of bf16 peak" if b["fraction_of_peak"] else ""
            said = f"best {b['tokens_per_s']:,.0f} tok/s at F {b['latents']}, batch {b['batch']} ({b['kernels']}){peak}"
        elif step == "end_to_end":
            said = (f"harvest {r['harvest_tokens_per_s']:,.0f} tok/s, train {r['train_tokens_per_s'] or 0:,.0f} tok/s, "
                    f"loader wait {r['loader_wait_s']:.2f} s, FVU {r['held_out_fvu']}")
        else:
            said = f"harvest/bare {r['median_ratio']:.3f}x (target <= {r['target']}x)"
        lines.append(f"{step:<14} {str(r['ok']):<5} {r['seconds']:>8.1f}  {said}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "out/gpu_check", help="where the JSON goes")
    parser.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command at most")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    functions = {name: globals()[name] for name in STEPS}
    results = {}
    with tempfile.TemporaryDirectory(prefix="xc-gpu-check-") as scratch:
        for step in args.steps.split(","):
            work = Path(scratch) / step
            work.mkdir()
            started = time.perf_counter()
            try:
                result = {"ok": True, **functions[step](args, work)}
            except Exception as e:  # recorded; the other steps still run
                result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            result["seconds"] = time.perf_counter() - started
            if (work / "log.txt").exists():
                result["log_tail"] = (work / "log.txt").read_text().splitlines()[-40:]
            results[step] = result
            (out / f"{step}.json").write_text(json.dumps(result, indent=1, default=str))
            print(summary_lines({step: result})[-1], flush=True)
    summary = summary_lines(results)
    (out / "summary.json").write_text(json.dumps({"dry_run": args.dry_run, "lines": summary,
                                                  "ok": all(r["ok"] for r in results.values())}, indent=1))
    print("\n" + "\n".join(summary))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
