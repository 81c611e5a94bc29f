"""Stores at URLs (s3://, gs://, any fsspec protocol): where paths end and object storage begins.

    remote.configure({"endpoint_url": "http://127.0.0.1:9000"})   # --storage-option, once per process
    out = remote.location("s3://bucket/acts.zarr")                  # a UrlPath; a local path stays a Path
    zarr.open_group(remote.zarr_target(out), mode="r")

Object stores have no rename and no OS lock. The store keeps its guarantees there by what an object
store does offer (see xc-store(5), OBJECT STORAGE): a PUT is atomic, so every chunk and every
zarr.json is whole or absent; the commit is the PUT of the group's zarr.json; one writer per output
is a lock object created with a conditional PUT (If-None-Match: *), which fails if it exists.

fsspec and its back-ends are imported on first use only: `xc --help` stays fast, and a missing
back-end is one line naming the extra that installs it.
"""

import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from xcli.errors import BadInput
from xcli.options import option

URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.+)$")
# The pip extra that installs each protocol's fsspec back-end.
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
LOCAL_PROTOCOLS = ("file", "local")

_options: dict = {}


def parse_storage_option(text: str) -> tuple[str, object]:
    """'KEY=VALUE' -> (KEY, VALUE); a VALUE that is JSON (true, 3, {"a": 1}) is parsed, other text stays text."""
    key, sep, value = str(text).partition("=")
    if not sep or not key.strip():
        raise ValueError(f"{text!r} is not KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip(), parsed


def storage_options_option():
    """--storage-option, a field of the config of every command that reads or writes a store; the config
    passes its value to `configure`."""
    return option(
        (), "An fsspec storage option for stores given as URLs (s3://BUCKET/STORE, gs://..., any fsspec "
            "protocol), repeatable, e.g. endpoint_url=http://127.0.0.1:9000 or anon=true (JSON values are "
            "parsed). Credentials come from the protocol's usual places (AWS_* variables, ~/.aws, ...).",
        flags=("--storage-option",), metavar="KEY=VALUE", multiple=True, parse=parse_storage_option)


@dataclass(frozen=True)
class StorageConfig:
    """The storage options alone: `xc info` (no other options) and Python callers."""

    storage_options: tuple[tuple[str, object], ...] = storage_options_option()

    def __post_init__(self):
        configure(self.storage_options)


def configure(options) -> None:
    """Storage options for every URL this process opens (merged over those given before): the
    --storage-option of the command, set when its config is built. A bad pair is one line (exit 2)."""
    pairs = list(options.items()) if isinstance(options, dict) else list(options)
    for pair in pairs:
        if not (isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise BadInput(f"--storage-option {pair!r} is not KEY=VALUE")
    _options.update(dict(pairs))


def storage_options() -> dict:
    return dict(_options)


def is_url(path) -> bool:
    """Whether `path` names an object in a remote file system (not file://)."""
    if isinstance(path, UrlPath):
        return True
    match = URL.match(str(path)) if isinstance(path, str) else None
    return bool(match) and match.group(1).lower() not in LOCAL_PROTOCOLS


class UrlPath:
    """A store's URL, with the few Path methods the store's callers use on an output or input."""

    def __init__(self, url: str):
        url = str(url).rstrip("/")
        match = URL.match(url)
        if not match:
            raise BadInput(f"{url!r} is not a URL")
        self.url, self.protocol, self.key = url, match.group(1).lower(), match.group(2)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    def joinpath(self, *parts: str) -> "UrlPath":
        return UrlPath("/".join([self.url, *parts]))

    __truediv__ = joinpath

    def fs(self):
        return filesystem(self.protocol)

    def exists(self) -> bool:
        fs = self.fs()
        fs.invalidate_cache()
        return fs.exists(self.key)

    def is_symlink(self) -> bool:
        return False

    def resolve(self) -> "UrlPath":
        return self

    def expanduser(self) -> "UrlPath":
        return self


def location(path):
    """A UrlPath for a URL; anything else as given (callers turn it into a Path as before)."""
    if isinstance(path, UrlPath) or not is_url(path):
        return path
    return UrlPath(str(path))


def filesystem(protocol: str):
    """The fsspec file system of `protocol` with the configured options; one line if its back-end is missing."""
    try:
        import fsspec
    except ImportError:
        raise BadInput(missing_extra(protocol)) from None
    try:
        return fsspec.filesystem(protocol, **_options)
    except ImportError:
        raise BadInput(missing_extra(protocol)) from None
    except ValueError as e:  # an unknown protocol
        raise BadInput(f"{protocol}:// is not a storage protocol fsspec knows ({e})") from None
    except TypeError as e:  # an option the back-end does not take
        raise BadInput(f"--storage-option: {e}") from None


def missing_extra(protocol: str) -> str:
    extra = EXTRAS.get(protocol)
    how = f"pip install 'xcli[{extra}]'" if extra else f"install the fsspec back-end for {protocol}://"
    return f"stores at {protocol}:// URLs need an optional package: {how}"


def zarr_target(path, read_only: bool = False):
    """What zarr.open_group takes for `path`: the path's text, or an fsspec store for a URL."""
    if not is_url(path):
        return str(path)
    url = location(path)
    url.fs()  # a missing back-end is one line here, not zarr's traceback
    import zarr

    return zarr.storage.FsspecStore.from_url(url.url, storage_options=dict(_options), read_only=read_only)


def resolved(path) -> str:
    """The path as a checkpoint or export records it: absolute for a local path, the URL itself for a URL."""
    from pathlib import Path

    return str(path) if is_url(path) else str(Path(path).resolve())


# -- one writer per output, without OS locks ------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


@contextmanager
def output_lock(path: UrlPath):
    """One writer per output at a URL: the lock object `.NAME.lock` beside it, created by a conditional PUT
    (it fails when the object exists, on S3 and servers that honour If-None-Match) and deleted at the end.

    A lock left by a writer that was killed on this machine (its pid is gone) is taken over; one from
    another machine is refused with its holder named: delete it by hand once no writer runs."""
    fs = path.fs()
    parent = path.key.rsplit("/", 1)[0] if "/" in path.key else path.key
    lock = f"{parent}/.{path.name}.lock"
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode()
    for _ in range(3):
        try:
            fs.pipe_file(lock, mine, mode="create")
            break
        except FileNotFoundError:  # no such bucket: nothing can be written, and the command's own check says so
            yield
            return
        except FileExistsError:
            try:
                holder = json.loads(fs.cat_file(lock))
            except FileNotFoundError:  # released meanwhile
                continue
            except ValueError:
                holder = {}
            here = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            if here and not _pid_alive(holder["pid"]):
                fs.rm_file(lock)  # its writer was killed (kill -9): the lock is stale
                continue
            raise BadInput(f"output {str(path)!r} is being written by another xc process ({holder.get('host')}, "
                           f"pid {holder.get('pid')}), by its lock object {path.protocol}://{lock}; wait for it, "
                           f"or delete that object if no writer runs") from None
        except (TypeError, NotImplementedError, ValueError):
            raise BadInput(f"{path.protocol}:// cannot create an object only if it is absent, so xc cannot "
                           f"guarantee one writer for {str(path)!r}; write the store locally and copy it there"
                           ) from None
    else:
        raise BadInput(f"output {str(path)!r}: the lock object {path.protocol}://{lock} keeps changing hands")
    try:
        yield
    finally:
        try:
            fs.rm_file(lock)
        except FileNotFoundError:
            pass
