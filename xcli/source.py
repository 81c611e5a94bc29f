"""A source: one stream of activations, a (model, site, layer) of width d.

Stores and checkpoints both list their sources; this module needs neither zarr nor
torch, so a checkpoint loader reads sources without opening a store.
"""

import re
from dataclasses import asdict, dataclass

from xcli.errors import BadInput

SOURCE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Source:
    """One stream of activations: a (model, site, layer) with width d."""

    name: str
    model: str
    site: str
    layer: int | None
    d: int
    revision: str | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Source":
        fields = {k: data.get(k) for k in ("name", "model", "site", "layer", "d", "revision")}
        fields["d"] = int(fields["d"])
        return cls(**fields)


def validate_source_names(sources: list[Source]) -> None:
    names = [s.name for s in sources]
    for name in names:
        if not SOURCE_NAME.match(name):
            raise BadInput(f"source name {name!r} is not valid; use letters, digits, '_', '.' and '-'")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInput(f"source names must be unique; repeated: {', '.join(duplicates)}")
