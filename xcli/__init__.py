"""xc: sparse crosscoders across layers and models.

The command line is `xc`; everything it does is a call into this package.
"""

from xcli.errors import BadInput, XcError
from xcli.version import __version__

__all__ = ["__version__", "BadInput", "XcError"]
