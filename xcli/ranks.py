"""Which process of a torchrun job this is, and the rule that one rank speaks for all.

Under torchrun every rank runs the same command. Results, and errors that every rank
meets alike (a bad argument), are printed by rank 0 alone; the other ranks exit with the
same code and print nothing. No torch here: the command line reads it before any work.
"""

import os

from xcli.errors import XcError


def launched() -> bool:
    """Whether this process is one of several that torchrun (or SLURM via torchrun) started."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def speaks() -> bool:
    """Whether this process prints results: rank 0 of a torchrun job, or a lone process."""
    return not launched() or int(os.environ.get("RANK", "0")) == 0


class ReportedByRankZero(XcError):
    """An error that stops every rank of a torchrun job; rank 0 prints it, the others exit quietly."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def for_this_rank(error: XcError) -> XcError:
    """An error that every rank meets alike (e.g. a bad argument), as this rank should raise it."""
    if not speaks():
        return ReportedByRankZero(str(error), error.exit_code)
    return error
