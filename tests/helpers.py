"""Helpers that tests in several folders use: running and killing torchrun jobs."""

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

from xcli.train import loop as tr

ROOT = Path(__file__).resolve().parents[1]
# One thread per process, as each torchrun rank computes, so that results agree bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def descendants(pid: int) -> list[int]:
    """A process and everything it started (torchrun starts its workers in sessions of their own)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in descendants(int(child))]


def kill_job_when(proc: subprocess.Popen, ready, timeout: float) -> None:
    """Once ready() (the job still running), kill -9 torchrun and its workers at once, as a scheduler would."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.002)
    for pid in descendants(proc.pid):
        os.kill(pid, signal.SIGKILL)


def saved_step(out) -> int:
    try:
        return torch.load(tr.state_path(out), weights_only=True)["step"]
    except Exception:
        return -1
