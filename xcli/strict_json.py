"""JSON that strict parsers accept: Python writes NaN and Infinity bare, which is not JSON.

Every JSON xc writes for others to read (stdout lines, --log lines, checkpoint and store
metadata, export manifests) goes through `dumps`, which writes a non-finite number as null.
"""

import json
import math


def finite_or_null(value):
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)
