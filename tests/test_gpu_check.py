"""benchmarks/gpu_check.sh, the one-call GPU check, runs every step on the CPU with --dry-run."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("environment", "tests", "train_speed", "end_to_end", "harvest_speed")


def test_dry_run_writes_every_step_as_json_and_a_summary(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {step: json.loads((out / f"{step}.json").read_text()) for step in STEPS}
    assert all(r["ok"] for r in results.values()), {s: r.get("error") for s, r in results.items()}
    assert results["environment"]["dry_run"] is True
    assert results["tests"]["tests"] >= 4 and results["tests"]["failures"] == 0
    assert any("cuda" in name for name in results["tests"]["skipped_tests"])  # skipped on CPU, counted
    speed = results["train_speed"]
    assert speed["speed"] and {"tokens_per_s", "tflops", "gemm_tflops"} <= set(speed["best"])
    assert {"encoder", "selection", "decode", "backward", "optimizer"} <= set(speed["split"][0]["seconds"])
    run = results["end_to_end"]
    assert run["steps"] > 0 and 0 <= run["held_out_fvu"] < 2 and run["loader_wait_s"] >= 0
    assert results["harvest_speed"]["median_ratio"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and len(summary["lines"]) == 1 + len(STEPS)
    assert (out / "log.txt").read_text().count("True") >= len(STEPS)  # the summary, as printed


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(out), "--steps",
                           "environment,harvest_speed", "--timeout", "120"],  # no --dry-run and no GPU
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 1
    environment = json.loads((out / "environment.json").read_text())
    assert not environment["ok"] and "--dry-run" in environment["error"]
    assert (out / "harvest_speed.json").exists()  # ran, and failed or not, after the failed step
