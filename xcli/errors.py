"""The two kinds of failure a user can meet, and the exit codes they map to."""


class XcError(Exception):
    """A runtime failure: the input was fine but the job could not finish (exit 1)."""

    exit_code = 1


class BadInput(XcError):
    """A bad argument, file or value supplied by the user (exit 2).

    The message is one line that names the bad value and says what would be valid.
    """

    exit_code = 2
