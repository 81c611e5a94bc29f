"""Training a crosscoder (`xc train`).

    from xcli.train import TrainConfig, train
    path = train(TrainConfig(stores=("acts.zarr",), output="xc.safetensors", k=32))

config.py declares the options (no torch, so `xc --help` stays fast); loop.py is the
training run: defaults resolved against the stores, the step, checkpoints and resume.
"""

import importlib

from xcli.train.config import TrainConfig


def __getattr__(name: str):
    # train() and the rest of the loop import torch: loaded on first use, not by `xc --help`.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("xcli.train.loop"), name)


__all__ = ["TrainConfig", "train"]
