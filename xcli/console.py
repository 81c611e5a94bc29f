"""Everything xc prints that is not a result goes through here, to stderr.

stdout carries results only (a path, or JSON lines) so that commands chain. Info
messages and progress bars are shown only when stderr is a terminal and --quiet
is off, so cron mail and CI logs stay clean; warnings are shown unless --quiet.
"""

import sys
from dataclasses import dataclass

from tqdm import tqdm


@dataclass
class Settings:
    quiet: bool = False
    debug: bool = False


settings = Settings()


def _interactive() -> bool:
    return not settings.quiet and sys.stderr.isatty()


def info(message: str) -> None:
    """A progress note for a person watching a terminal."""
    if _interactive() or settings.debug:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """Something the user should know even in a log file (e.g. a short corpus)."""
    if not settings.quiet:
        print(f"xc: warning: {message}", file=sys.stderr, flush=True)


def error(message: str) -> None:
    print(f"xc: error: {message}", file=sys.stderr, flush=True)


def progress(iterable=None, *, total=None, desc=None, unit="it", **kwargs) -> tqdm:
    """A tqdm bar on stderr that disables itself outside a terminal or under --quiet."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not _interactive(),
        dynamic_ncols=True,
        **kwargs,
    )
