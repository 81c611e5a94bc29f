"""Which torch device a command computes on: the --device option, checked once here."""

import torch

from xcli.errors import BadInput

DEVICES = "auto, cpu, cuda or cuda:N"


def resolve_device(name: str) -> torch.device:
    """`auto` (the first CUDA GPU if there is one, else the CPU), `cpu`, `cuda` or `cuda:N`; checked here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BadInput(f"--device {name!r} is not a device; use {DEVICES}") from None
    if device.type not in ("cpu", "cuda"):
        raise BadInput(f"--device {name!r} is not supported; use {DEVICES}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise BadInput(f"--device {name!r} is not available: no CUDA device is on this machine; use cpu or auto")
        if (device.index or 0) >= count:
            raise BadInput(f"--device {name!r} is not available: this machine has {count} CUDA device(s)")
    return device
