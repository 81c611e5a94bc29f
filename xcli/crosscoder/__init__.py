"""The crosscoder itself: the module, its sparse path, kernels and variants.

config.py names the architectures (no torch); model.py is the `Crosscoder` module with
checkpoint save and load; sparse.py is the sparse training path and kernels.py its
Triton kernels; fmx.py the factorized masked crosscoders; source_parallel.py splits one
crosscoder's sources over torchrun ranks.

    from xcli.crosscoder import Crosscoder, load, save
"""

import importlib


def __getattr__(name: str):
    # The module imports torch: loaded on first use, so that config.py stays light.
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(importlib.import_module("xcli.crosscoder.model"), name)


__all__ = ["Crosscoder", "load", "save"]
