"""xc: sparse crosscoders across layers and models.

The command line is `xc`; everything it does is a call into this package.
"""

from xcli.errors import BadInput, XcError
from xcli.version import __version__


def load(path, device="cpu"):
    """Open a crosscoder checkpoint (.safetensors) as a module with encode/decode."""
    from xcli.crosscoder import load as _load

    return _load(path, device)


__all__ = ["__version__", "BadInput", "XcError", "load"]
