"""Files on disk, read and written safely: every output, and the text inputs.

Every command that writes a file or a folder goes through `check_output` (and, with
--overwrite, `check_replaceable`: only what xc wrote, never an input) before doing work,
holds `output_lock` (one writer per output) while it works, and writes through
`atomic_path` (temp name beside the target, then rename), so a crash never leaves a
half-written artifact under the final name and nothing is clobbered silently. Paths built
from names read in files stay under the output (`inside`); text inputs are strict UTF-8
(`read_utf8`, `utf8_stdin`).
"""

import errno
import fcntl
import io
import json
import os
import re
import shutil
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

from safetensors import safe_open

from xcli import remote
from xcli.errors import BadInput

UMASK = os.umask(0o022)  # read once (setting it is the only way to read it), then put back
os.umask(UMASK)


def check_output(path, overwrite: bool = False, resume: bool = False) -> Path:
    """Refuse to write over an existing output unless asked to."""
    if remote.is_url(path):
        return _check_url_output(remote.location(path), overwrite or resume)
    path = Path(path)
    if path.exists() and not (overwrite or resume):
        raise BadInput(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    if not path.parent.exists():
        raise BadInput(f"output folder {str(path.parent)!r} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):  # also true of a read-only mount, for root too
        raise BadInput(f"output folder {str(path.parent)!r} is not writable (read-only, or no permission); "
                       f"choose another -o")
    return path


def _check_url_output(path, replace: bool):
    """check_output for a URL: its bucket (or container) must be there; an existing output needs --overwrite."""
    fs = path.fs()
    try:
        fs.invalidate_cache()
        bucket_found = fs.exists(path.bucket)
    except (OSError, ValueError) as e:  # credentials or endpoint wrong: say so on one line
        raise BadInput(f"output {str(path)!r} cannot be reached ({type(e).__name__}: {str(e)[:160]})") from None
    if not bucket_found:
        raise BadInput(f"output bucket {path.protocol}://{path.bucket} does not exist or cannot be read; "
                       f"create it first")
    if path.exists() and not replace:
        raise BadInput(f"output {str(path)!r} already exists; pass --overwrite to replace it")
    return path


# Writes the machine refused: one line (exit 1) instead of an internal error.
MACHINE_REFUSALS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                    errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
TEMP_NAME = re.compile(r"^\.(.+)\.tmp-\d+-[0-9a-f]{8}$")


def target_of_temps(path) -> str:
    """The path with each temp name (temp_path_for) replaced by the name it stands for."""
    parts = [TEMP_NAME.sub(r"\1", part) for part in Path(path).parts]
    return str(Path(*parts)) if parts else str(path)


def machine_refusal(error: BaseException) -> str | None:
    """One line for a failure of the machine rather than of xc or its input (a full disk, a read-only
    file system, no permission), or None. Libraries that wrap the OS error keep only its text."""
    if isinstance(error, OSError) and error.errno in MACHINE_REFUSALS:
        where = f": {target_of_temps(error.filename)!r}" if error.filename else ""
        return f"{MACHINE_REFUSALS[error.errno]}{where}"
    text = str(error)
    if "No space left on device" in text or "(os error 28)" in text:
        return f"no space left on device ({type(error).__name__}: {text[:160]})"
    return None


# What xc writes at each kind of output, told by the marker it leaves there (check_replaceable).
# The markers are written down here and not imported, so that this module needs neither torch nor zarr:
# a store's zarr.json holds attributes["xc"]["format"] (xcli.data.store.FORMAT), a checkpoint's
# safetensors metadata has "xc" (xcli.crosscoder.model.save), a synth truth's "xc" metadata has the
# format of xcli.data.synth.TRUTH_FORMAT, an export folder holds xc-export.json (xcli.export.common).
REPLACEABLE = {"store": "an xc store", "checkpoint": "an xc checkpoint", "truth": "an xc synth truth file",
               "export": "an xc export folder", "file": "a file xc writes"}


def _safetensors_xc(path: Path) -> dict | None:
    """The parsed "xc" metadata of a safetensors file, {} when it has none, None when it is no safetensors."""
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        return json.loads(meta["xc"]) if "xc" in meta else {}
    except Exception:  # safetensors raises its own error for a file that is not one
        return None


def _safetensors_object_xc(path) -> dict | None:
    """_safetensors_xc of an object at a URL, from its header alone: 8 bytes of header length, then JSON."""
    try:
        with path.fs().open(path.key, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return None
            header = json.loads(f.read(size))
        meta = header.get("__metadata__") or {}
        return json.loads(meta["xc"]) if "xc" in meta else {}
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _safetensors_kind(meta: dict | None, kind: str) -> str | None:
    """Why safetensors metadata `meta` is not what xc writes as `kind` ("checkpoint" or "truth"), or None."""
    if meta is None:
        return "not a safetensors file"
    if kind == "checkpoint" and meta and meta.get("format") != "planted-dictionary":
        return None
    if kind == "truth" and isinstance(meta, dict) and meta.get("format") == "planted-dictionary":
        return None
    return "no xc metadata"


def _not_written_by_xc(path: Path, kind: str) -> str | None:
    """Why `path` is not what xc writes as `kind`, or None when it is."""
    if kind == "store":
        try:
            attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
            if attrs.get("xc", {}).get("format") == "activations":
                return None
        except (OSError, ValueError, AttributeError):
            pass
        return "no xc metadata"
    if kind == "export":
        try:
            if json.loads((path / "xc-export.json").read_text()).get("format") == "xc-export":
                return None
        except (OSError, ValueError, AttributeError):
            pass
        return "no xc-export.json manifest"
    if kind in ("checkpoint", "truth"):
        if not path.is_file():
            return "not a file"
        return _safetensors_kind(_safetensors_xc(path), kind)
    if kind == "file":
        return None if path.is_file() else "a folder" if path.is_dir() else "not a regular file"
    raise ValueError(f"unknown output kind {kind!r}")


def check_replaceable(path, kind: str, inputs=()) -> None:
    """Before --overwrite replaces `path`: refuse unless it is what xc writes there (`kind`, one of
    REPLACEABLE) and neither is nor holds one of the command's `inputs` (compared as resolved paths).

    A missing `path` passes. Refusals are one line (BadInput, exit 2) naming the path and why."""
    if remote.is_url(path):
        return _check_replaceable_url(remote.location(path), kind, inputs)
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    out = path.resolve()
    for given in inputs:
        if given is None or str(given) == "-" or remote.is_url(given):  # a URL is never a local output
            continue
        source = Path(given).expanduser().resolve()
        if source == out or out in source.parents:
            how = "is" if source == out else "holds"
            raise BadInput(f"output {str(path)!r} {how} an input of this command ({str(given)!r}); refusing to "
                           f"replace it with --overwrite; choose another -o")
    why = _not_written_by_xc(path, kind)
    if why is not None:
        raise BadInput(f"output {str(path)!r} is not {REPLACEABLE[kind]} ({why}); refusing to replace it with "
                       f"--overwrite; remove it yourself or choose another -o")


def _check_replaceable_url(path, kind: str, inputs) -> None:
    """check_replaceable for a URL: a store, recognised by the attributes in its zarr.json, or a synth truth
    (or a checkpoint) by its safetensors header."""
    if not path.exists():
        return
    if any(given is not None and remote.is_url(given) and str(remote.location(given)) == str(path)
           for given in inputs):
        raise BadInput(f"output {str(path)!r} is an input of this command; refusing to replace it with "
                       f"--overwrite; choose another -o")
    why = "no xc metadata" if kind == "store" else f"xc writes {REPLACEABLE[kind]} only to local paths"
    if kind in ("checkpoint", "truth"):
        why = _safetensors_kind(_safetensors_object_xc(path), kind)
        if why is None:
            return
    if kind == "store":
        try:
            attrs = json.loads(path.fs().cat_file(f"{path.key}/zarr.json")).get("attributes", {})
            if attrs.get("xc", {}).get("format") == "activations":
                return
        except (OSError, ValueError, AttributeError):
            pass
    raise BadInput(f"output {str(path)!r} is not {REPLACEABLE[kind]} ({why}); refusing to replace it with "
                   f"--overwrite; remove it yourself or choose another -o")


def inside(root, path) -> Path:
    """`path`, refused (BadInput) unless it resolves to `root` or somewhere under it.

    Outputs whose paths are built from names read in a file (a checkpoint's source names and
    layers) pass through here, so a hostile name never writes outside the output folder."""
    root, path = Path(root), Path(path)
    resolved_root, resolved = root.resolve(), path.resolve()
    if resolved != resolved_root and resolved_root not in resolved.parents:
        raise BadInput(f"refusing to write {str(path)!r}: it is outside the output {str(root)!r}")
    return path


def temp_path_for(path) -> Path:
    """A unique hidden name in the same folder, so the final rename is atomic."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # never signal a process group (0, negative): treat as not ours to judge
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # no process has such a number
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(path) -> list[Path]:
    """Remove the temps of `path` (`.NAME.tmp-PID-xxxxxxxx`, from temp_path_for) whose writer is dead,
    e.g. killed with SIGKILL; temps of live processes are kept. Returns what was removed."""
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:  # no folder: nothing left there; the caller's own checks say what is wrong
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        pid, _, tag = name[len(prefix):].partition("-")
        if not (pid.isdigit() and pid.isascii() and len(tag) == 8 and all(c in "0123456789abcdef" for c in tag)):
            continue
        if not _pid_alive(int(pid)):
            remove(path.parent / name)
            removed.append(path.parent / name)
    return removed


def remove(path) -> None:
    if remote.is_url(path):
        path = remote.location(path)
        if path.exists():
            path.fs().rm(path.key, recursive=True)
            path.fs().invalidate_cache()
        return
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_path(path, overwrite: bool = False):
    """Yield a temp path to write; on success move it to `path`, on failure delete it.

    Works for files and folders (a Zarr store, an export directory). Temps of the same target left by
    a writer that died (kill -9) are removed first.
    """
    path = Path(path)
    remove_stale_temps(path)
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
    raw = getattr(sys.stdin, "buffer", None)  # None: a text stream put there by a Python caller
    data = raw.read() if raw is not None else sys.stdin.read().encode("utf-8", "surrogateescape")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadInput(f"the path on stdin for '-' is not UTF-8 text "
                       f"(byte {e.start} is {data[e.start]:#04x})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
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
    process (kill -9 included), and the file goes when the block ends. At a URL: remote.output_lock."""
    if remote.is_url(path):
        with remote.output_lock(remote.location(path)):
            yield
        return
    path = Path(path)
    if not path.parent.is_dir():  # the command's own check says what is wrong
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            raise BadInput(f"output folder {str(path.parent)!r} is not writable ({MACHINE_REFUSALS[e.errno]}); "
                           f"choose another -o") from None
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
