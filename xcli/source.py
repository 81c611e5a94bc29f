"""A source: one stream of activations, a (model, site, layer) of width d.

Stores and checkpoints both list their sources; this module needs neither zarr nor
torch, so a checkpoint loader reads sources without opening a store.
"""

import re
from dataclasses import asdict, dataclass

from xcli.errors import BadInput

NAME_LENGTH = 200  # a path component (255 bytes at most) with room for temp and export prefixes
SOURCE_NAME = re.compile(rf"^[A-Za-z0-9_.-]{{1,{NAME_LENGTH}}}$")
SITE_NAME = re.compile(rf"^[A-Za-z0-9_.{{}}-]{{1,{NAME_LENGTH}}}$")
"""A site: a named site or a module path, which may hold a `{layer}` template; never a `/`."""


def is_plain_name(text, pattern=SOURCE_NAME) -> bool:
    """A name that is safe as one path component: it matches `pattern` and is not `.` or `..`."""
    return isinstance(text, str) and bool(pattern.match(text)) and text not in (".", "..")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    def from_json(cls, data, where: str | None = None) -> "Source":
        """A source as a store or checkpoint lists it, checked by the rule both share (`check_source`).

        `where` (e.g. "checkpoint 'x.safetensors'") starts the message of a BadInput."""
        check_source(data, where)
        return cls(**{k: data.get(k) for k in ("name", "model", "site", "layer", "d", "revision")})


def check_source(data, where: str | None = None) -> None:
    """The rule for a listed source: name a plain source name (not `.` or `..`), model a string,
    site a plain site name (no `/`), layer null or a whole number >= 0, d a whole number >= 1,
    revision null or a string. Raises BadInput naming `where`."""
    prefix = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise BadInput(f"{prefix}a source is {type(data).__name__} {data!r:.60}, not an object with name, model, "
                       f"site, layer and d")
    name = data.get("name")
    if not is_plain_name(name):
        raise BadInput(f"{prefix}source name {name!r:.80} is not valid; use up to {NAME_LENGTH} letters, digits, "
                       f"'_', '.' and '-' (not '.' or '..')")
    problem = None
    if not isinstance(data.get("model"), str) or not data.get("model"):
        problem = f"model {data.get('model')!r:.80} is not a model name"
    elif not is_plain_name(data.get("site"), SITE_NAME):
        problem = (f"site {data.get('site')!r:.80} is not a site name (up to {NAME_LENGTH} letters, digits, '_', '.', "
                   f"'-', no '/')")
    elif data.get("layer") is not None and not (_is_int(data.get("layer")) and data["layer"] >= 0):
        problem = f"layer {data.get('layer')!r:.80} is not null or a whole number >= 0"
    elif not (_is_int(data.get("d")) and data["d"] >= 1):
        problem = f"width d {data.get('d')!r:.80} is not a whole number >= 1"
    elif not isinstance(data.get("revision"), (str, type(None))):
        problem = f"revision {data.get('revision')!r:.80} is not null or a string"
    if problem:
        raise BadInput(f"{prefix}source {name!r}: {problem}")


def validate_source_names(sources: list[Source]) -> None:
    names = [s.name for s in sources]
    for name in names:
        if not is_plain_name(name):
            raise BadInput(f"source name {name!r:.80} is not valid; use up to {NAME_LENGTH} letters, digits, '_', '.' "
                           f"and '-' (not '.' or '..')")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise BadInput(f"source names must be unique; repeated: {', '.join(duplicates)}")
