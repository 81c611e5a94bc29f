"""Safe writing of artifacts: temp name beside the target, then rename.

Every command that writes a file or a folder goes through `check_output` before
doing work and `atomic_path` while writing, so a crash never leaves a
half-written artifact under the final name and nothing is clobbered silently.
"""

import fcntl
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


@contextmanager
def output_lock(path):
    """One writer per output: an exclusive OS lock on `.NAME.lock` beside it, held while the block runs.

    A second xc writing the same output stops at once with one line (exit 2). The lock dies with its
    process (kill -9 included), and the file goes when the block ends."""
    path = Path(path)
    if not path.parent.is_dir():  # the command's own check says what is wrong
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BadInput(f"output {str(path)!r} is being written by another xc process (pid {holder}); "
                           f"wait for it to finish, or stop it") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # not a lock file that its last holder removed while we opened it
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.unlink(lock)
        os.close(fd)
