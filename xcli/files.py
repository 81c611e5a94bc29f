"""Safe writing of artifacts: temp name beside the target, then rename.

Every command that writes a file or a folder goes through `check_output` before
doing work and `atomic_path` while writing, so a crash never leaves a
half-written artifact under the final name and nothing is clobbered silently.
"""

import io
import os
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from xcli.errors import BadInput

UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(UMASK)


def check_output(path, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse to write over an existing output unless asked to."""
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        raise BadInput(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise BadInput(f"output folder {str(path.parent)!r} does not exist; create it first")
    return path


def temp_path_for(path) -> Path:
    """A unique hidden name in the same folder, so the final rename is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove(path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path, overwrite: bool = False):
    """Yield a temp path to write; on success move it to `path`, on failure delete it.

    Works for files and folders (a Zarr store, an export directory).
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        yield tmp
        if tmp.is_file():  # some writers (safetensors) create 0600 files: give the mode open() would
            os.chmod(tmp, 0o666 & ~UMASK)
        if path.exists():
            if not overwrite:
                raise BadInput(f"output {str(path)!r} appeared while writing; pass --overwrite to replace it")
            if path.is_dir() and not path.is_symlink():
                # A folder cannot be replaced by rename in one step: move the old one aside first.
                old = temp_path_for(path)
                os.replace(path, old)
                os.replace(tmp, path)
                remove(old)
                return
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            remove(tmp)


def read_path_argument(value: str) -> str:
    """`-` means: read one path from stdin (the output of a previous `xc` command)."""
    if value != "-":
        return value
    lines = [line.strip() for line in sys.stdin.read().splitlines() if line.strip()]
    if len(lines) != 1:
        raise BadInput(f"expected one path on stdin for '-', got {len(lines)} lines")
    return lines[0]


def utf8_stdin():
    """stdin as strict UTF-8 text: Python's own stdin lets bad bytes through as surrogates, which
    fail later, far from their cause."""
    return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="strict")


def read_utf8(path, option: str) -> str:
    """A text file as UTF-8; other bytes are bad input that names the file and the first bad byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"{option} {str(path)!r} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}); "
                       f"convert it first, e.g. iconv -f latin1 -t utf-8") from None
