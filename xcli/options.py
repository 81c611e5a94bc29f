"""One declaration per option: a config field carries its flags, help and parser.

    @dataclass(frozen=True)
    class TrainConfig:
        k: int | None = option(None, "Active latents per token, for topk and batchtopk (default 32).")

The config dataclasses are the only place an option is written down. `xc --help`,
the man pages and docs/cli-reference.md are generated from their fields
(xcli.cli.params); Python callers build the same dataclasses. The field's default
is the command line's default. This module imports neither torch, zarr nor click,
so that `xc --help` stays fast.
"""

from dataclasses import MISSING, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line."""

    help: str
    flags: tuple[str, ...] = ()
    """Option names; default --field-name."""
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    parse: Callable[[str], Any] | None = None
    """Turns the command line's text into the field's value; a ValueError's message names the problem."""
    multiple: bool = False
    """Repeatable; the field holds a tuple of the values."""
    argument: bool = False
    """Positional; with `multiple`, one or more of them."""
    cli_default: str | None = None
    """The field's default as the command line writes it, where that differs (e.g. "10M")."""


def option(default: Any = MISSING, help: str = "", **how) -> Any:
    """A dataclass field that is also a command-line option (see `Option` for `how`)."""
    return field(default=default, metadata={"option": Option(help=help, **how)})


OVERWRITE_RULE = "Only what xc wrote is replaced, never an input of this command or a folder holding one."


def overwrite_option(what: str):
    """--overwrite, with the rule xcli.files.check_replaceable enforces."""
    return option(False, f"Replace {what}. {OVERWRITE_RULE}")


def option_of(f) -> Option | None:
    """The Option of a dataclass field, or None for fields only Python callers set."""
    return f.metadata.get("option")


# -- parsers: command-line text to values ------------------------------------------------------------

COUNT_SUFFIXES = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9}


def count(text: str) -> int:
    """A whole number that may carry a K, M or B suffix: '10M' -> 10_000_000."""
    if isinstance(text, int):
        return text
    clean = str(text).strip().replace("_", "").lower()
    factor = COUNT_SUFFIXES.get(clean[-1:], 1)
    try:
        number = float(clean[:-1] if factor > 1 else clean) * factor
    except ValueError:
        raise ValueError(f"{text!r} is not a count (e.g. 4096, 50K, 10M)") from None
    if number != int(number):
        raise ValueError(f"{text!r} is not a whole number")
    return int(number)


def name_list(text: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); an empty text gives an empty tuple, which configs reject by name."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def whole_numbers(text: str) -> tuple[int, ...]:
    """'8,8,8' -> (8, 8, 8)."""
    try:
        return tuple(int(r) for r in text.split(","))
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of whole numbers (e.g. 16 or 16,8,16)") from None


def pair(separator: str, cast: Callable[[str], Any], written: str) -> Callable[[str], tuple]:
    """A parser of two values: pair('-', int, 'MIN-MAX')('1-4') -> (1, 4)."""
    def parse(text: str) -> tuple:
        parts = text.split(separator)
        try:
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise ValueError
            return tuple(cast(p.strip()) for p in parts)
        except ValueError:
            raise ValueError(f"{text!r} is not two values written {written}") from None
    return parse
