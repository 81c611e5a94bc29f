"""The activation store: a Zarr v3 group of per-source token-row arrays.

Layout (the public contract, documented in man/xc-store.5):

    STORE/                       a Zarr v3 group; attrs["xc"] holds the metadata below
      acts/<source>              (n_tokens, d_source) float16 | float32 | uint16 (bfloat16 bits)
      tokens                     (n_tokens,) int32   token id of each row
      sequence                   (n_tokens,) int64   index of the context window the row came from
      position                   (n_tokens,) int32   position of the row inside that window
      stats/<source>/mean        (d_source,) float64 mean activation vector

Every array has Zarr v3 dimension names: "token" for rows, "<source>.d" for a source's
width, so that `xarray.open_zarr(STORE, group="acts", consolidated=False)` opens it.

attrs["xc"] = {"format": "activations", "version": 1, "sources": [{name, model, revision,
site, layer, d}, ...], "n_tokens", "complete", "dtype", "tokenizer", "context_length",
"dataset", "created_by", "stats": {source: {"count", "mean_sq_norm", "mean"}}, ...}.

Rows are written in whole chunks; `n_tokens` in the attributes is the commit point:
rows past it (from a killed writer, or capacity reserved ahead) are ignored by readers
and overwritten on resume. Statistics are recorded when the store is closed.
Several processes (xc harvest under torchrun) write one store with ChunkWriter:
each writes whole chunks at their places and commits each by a record file in
progress/; the process that finishes the store merges the records, trims the
arrays and commits n_tokens, so the finished store is like any other.
Readers accept float16/float32/bfloat16-as-uint16 arrays and stores without
statistics, token arrays or dimension names (e.g. written by other tools or by an
earlier xc), computing what they need.
"""

import asyncio
import io
import math
import os
import shutil
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from xcli import remote
from xcli.data.config import CODECS, DEFAULT_CHUNK_ROWS, DEFAULT_CODEC, STORAGE_DTYPES
from xcli.errors import BadInput, XcError
from xcli.source import Source, check_source, is_plain_name, validate_source_names
from xcli.version import __version__

FORMAT, VERSION = "activations", 1
# A store written by several processes: per-chunk commit records, and the arrays' length
# until it is finished (more rows than any corpus; Zarr stores no chunk that is never written).
PROGRESS = "progress"
SHARDED_ROWS = 1 << 40
TOKEN_ARRAYS = (("tokens", "int32"), ("sequence", "int64"), ("position", "int32"))
# A store of models with different tokenizers (xc harvest --align) has, besides TOKEN_ARRAYS (those of
# its first model), each row's document and character span, and every model's own token id and position.
SPAN_ARRAYS = (("document", "int64"), ("char_start", "int64"), ("char_end", "int64"))
# Zarr v3 dimension names (what xarray.open_zarr needs): every row array shares ROW_DIM; a source's
# width is "<source>.d", in its activations and its statistics alike. Readers do not need them.
ROW_DIM = "token"
# Writers store every chunk, zeros included (Zarr skips chunks equal to the fill value by default),
# so that readers can tell a missing chunk file, which is damage, from rows of zeros.
STORE_EVERY_CHUNK = {"write_empty_chunks": True}


def aligned_arrays(models) -> tuple[tuple[str, str], ...]:
    """The row arrays an aligned store holds besides TOKEN_ARRAYS, for its models' aliases."""
    per_model = tuple((f"aligned/{alias}/{name}", "int32") for alias in models for name in ("tokens", "position"))
    return SPAN_ARRAYS + per_model


def row_arrays(meta: dict) -> tuple[tuple[str, str], ...]:
    """Every row array besides the activations: TOKEN_ARRAYS, and the aligned arrays of an aligned store."""
    alignment = meta.get("alignment")
    return TOKEN_ARRAYS + (aligned_arrays(alignment["models"]) if isinstance(alignment, dict) else ())


def store_path(path):
    """A local store's Path, or a UrlPath for a store at a URL (xcli.remote)."""
    return remote.location(path) if remote.is_url(path) else Path(path)


def width_dim(name: str) -> str:
    """The dimension name of source `name`'s width."""
    return f"{name}.d"


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even) and return the bit patterns as uint16."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def decode_rows(raw: np.ndarray) -> np.ndarray:
    """Stored rows (float16, float32 or bfloat16 bits) as float32."""
    if raw.dtype == np.uint16:
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32, copy=False)


def encode_rows(values: np.ndarray, dtype: str) -> np.ndarray:
    """Rows in the storage dtype of a store (`dtype` as in its attributes)."""
    if dtype == "bfloat16":
        # uint16 rows are bfloat16 bits already (e.g. from a bfloat16 model): keep them as they are.
        return values if values.dtype == np.uint16 else float32_to_bf16_bits(values)
    return values.astype(dtype, copy=False)


def _compressors(codec: str):
    if codec == "none":
        return None
    if codec == "zstd":
        return zarr.codecs.ZstdCodec(level=3)
    if codec == "blosc-lz4":
        return zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    raise BadInput(f"codec {codec!r} is not known; use one of {', '.join(CODECS)}")


def damaged(path, what: str) -> BadInput:
    """The one-line error of a store that is not what its attributes say."""
    return BadInput(f"store {str(path)!r} is damaged: {what}")


# The row dtypes readers accept in a store without attributes (uint16: bfloat16 bits).
FOREIGN_DTYPES = ("float16", "float32", "uint16")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(path, meta) -> dict:
    """attrs["xc"], checked: format, version, sources, n_tokens and dtype well-formed."""
    if not isinstance(meta, dict):
        raise damaged(path, f'attrs["xc"] is a {type(meta).__name__}, not an object')
    if meta.get("format") != FORMAT:
        raise damaged(path, f'attrs["xc"]["format"] is {meta.get("format")!r}, not {FORMAT!r}')
    if meta.get("version") != VERSION:
        raise damaged(path, f'attrs["xc"]["version"] is {meta.get("version")!r}; this xc reads version {VERSION}')
    sources = meta.get("sources")
    if not isinstance(sources, list) or not sources:
        raise damaged(path, 'attrs["xc"]["sources"] is missing or not a non-empty list')
    for entry in sources:  # the rule stores and checkpoints share
        check_source(entry, f"store {str(path)!r} is damaged")
    names = [entry["name"] for entry in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise damaged(path, f'attrs["xc"]["sources"] repeats {", ".join(repeated)}')
    n_tokens = meta.get("n_tokens")
    if not _is_int(n_tokens) or n_tokens < 0:
        raise damaged(path, f'attrs["xc"]["n_tokens"] is {n_tokens!r}, not a non-negative integer')
    if meta.get("dtype") not in STORAGE_DTYPES:
        raise damaged(path, f'attrs["xc"]["dtype"] is {meta.get("dtype")!r}, not one of {", ".join(STORAGE_DTYPES)}')
    if not isinstance(meta.get("complete", True), bool):
        raise damaged(path, f'attrs["xc"]["complete"] is {meta["complete"]!r}, not true or false')
    if "alignment" in meta:
        _check_alignment(path, meta["alignment"], {entry["model"] for entry in sources})
    return dict(meta)


def _check_alignment(path, alignment, source_models: set) -> None:
    """attrs["xc"]["alignment"] of an aligned store: its models are the sources' models, named once."""
    if not isinstance(alignment, dict):
        raise damaged(path, f'attrs["xc"]["alignment"] is a {type(alignment).__name__}, not an object')
    models = alignment.get("models")
    if not isinstance(models, list) or not models or not all(is_plain_name(m) for m in models) \
            or len(set(models)) != len(models) or set(models) != source_models:
        raise damaged(path, f'attrs["xc"]["alignment"]["models"] is {models!r}, not the list of the sources\' '
                            f'models ({", ".join(sorted(source_models))}), each once and a plain name')


def _array_dir(path: Path, array: zarr.Array) -> Path:
    return Path(path) / array.path


def _object_sizes(path, array: zarr.Array) -> dict[str, int]:
    """Sizes of an array's objects at a URL by chunk key: one listing, not one request per chunk."""
    url = remote.location(path)
    fs = url.fs()
    prefix = fs._strip_protocol(f"{url.key}/{array.path}").rstrip("/") + "/"  # as find() spells names ("/b/k" in memory://)
    fs.invalidate_cache()
    return {name[len(prefix):]: int(info["size"]) for name, info in fs.find(prefix, detail=True).items()
            if name.startswith(prefix)}


def bad_chunk_files(path, array: zarr.Array, rows: int) -> tuple[list[str], list[str]]:
    """Keys of the chunks (or shards) that rows [0, rows) of `array` need: those missing on disk, and
    (for an uncompressed array, whose chunk files have one size) those of the wrong size, e.g. truncated.

    One stat per chunk file, no data read: fast for big stores."""
    grid = array.metadata.chunk_grid.chunk_shape
    folder = None if remote.is_url(path) else _array_dir(path, array)
    counts = [-(-rows // grid[0])] + [-(-n // c) for n, c in zip(array.shape[1:], grid[1:])]
    plain = not array.compressors and not array.filters and type(array.serializer).__name__ == "BytesCodec"
    size = int(np.prod(grid)) * array.dtype.itemsize if plain else None
    sizes = _object_sizes(path, array) if remote.is_url(path) else None
    missing, wrong = [], []
    for coords in np.ndindex(*counts):
        key = array.metadata.encode_chunk_key(tuple(int(c) for c in coords))
        try:
            found = sizes[key] if sizes is not None else os.stat(folder / key).st_size
        except (FileNotFoundError, NotADirectoryError, KeyError):
            missing.append(key)
            continue
        if size is not None and found != size:
            wrong.append(key)
    return missing, wrong


def read_checked(path, array: zarr.Array, selection):
    """`array[selection]`, with a chunk that cannot be decoded (truncated, corrupt) as BadInput naming it."""
    try:
        return array[selection]
    except MemoryError:
        raise
    except Exception as e:  # zarr and numcodecs raise ValueError, RuntimeError, ... for bad bytes
        key = _bad_chunk(array, selection)
        where = f"chunk {key!r} of array {array.path!r}" if key else f"array {array.path!r}"
        raise damaged(path, f"{where} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                      ) from None


def _bad_chunk(array: zarr.Array, selection) -> str | None:
    """The first chunk key of a row range that fails to decode (only called after a failure)."""
    rows = selection if isinstance(selection, slice) else slice(None)
    start, stop, _ = rows.indices(array.shape[0])
    step = array.metadata.chunk_grid.chunk_shape[0]
    for first in range(start - start % step, stop, step):
        try:
            array[first:min(first + step, array.shape[0])]
        except Exception:
            coords = (first // step,) + (0,) * (array.ndim - 1)
            return array.metadata.encode_chunk_key(coords)
    return None


class ActivationStore:
    """Read access to a store. Rows come back as float32 numpy arrays.

    Opening checks the store against its attributes (xc-store(5)): attrs["xc"] well-formed,
    every source's array present with the shape and dtype they say, the token arrays as long,
    and every chunk of the committed rows present on disk (names only; no data is read).
    A store that fails is a BadInput naming the store and what is wrong.
    """

    def __init__(self, path, group: zarr.Group):
        self.path = store_path(path)
        self.group = group
        if "acts" not in group:
            raise BadInput(f"{str(path)!r} is not an activation store: it has no 'acts' arrays")
        arrays = group["acts"]
        if "xc" in group.attrs:
            self.meta = _check_meta(self.path, group.attrs["xc"])
            self.sources = [Source.from_json(s, f"store {str(path)!r} is damaged") for s in self.meta["sources"]]
        else:  # written by another tool: describe the arrays we find
            self.meta = {}
            found = sorted(arrays.arrays())
            if not found:
                raise damaged(self.path, "it has no arrays under 'acts' and no attributes")
            for n, a in found:
                if a.ndim != 2 or str(a.dtype) not in FOREIGN_DTYPES:
                    raise damaged(self.path, f"array 'acts/{n}' is {a.ndim}-D {a.dtype}, not 2-D float16 or float32")
            self.sources = [Source(name=n, model="unknown", site="unknown", layer=None, d=a.shape[1])
                            for n, a in found]
        self.arrays = {}
        for s in self.sources:
            if s.name not in arrays or not isinstance(arrays[s.name], zarr.Array):
                raise damaged(self.path, f"array 'acts/{s.name}' is missing")
            self.arrays[s.name] = arrays[s.name]
        lengths = {a.shape[0] for a in self.arrays.values()}
        self.n_tokens = int(self.meta.get("n_tokens", min(lengths) if lengths else 0))
        self.complete = bool(self.meta.get("complete", True))
        self.dtype = self.meta.get("dtype") or str(next(iter(self.arrays.values())).dtype)
        self._check_arrays()

    def _check_arrays(self) -> None:
        """Shapes, dtypes and chunks of the committed rows (see the class)."""
        expected = np.dtype(STORAGE_DTYPES[self.dtype]) if self.dtype in STORAGE_DTYPES else None
        for s in self.sources:
            a = self.arrays[s.name]
            if a.ndim != 2 or a.shape[0] < self.n_tokens or a.shape[1] != s.d:
                raise damaged(self.path, f"array 'acts/{s.name}' has shape {tuple(a.shape)}, where "
                                         f"{self.n_tokens} rows of width {s.d} are committed")
            if expected is not None and a.dtype != expected:
                raise damaged(self.path, f"array 'acts/{s.name}' holds {a.dtype}, where the store's dtype "
                                         f"{self.dtype} is stored as {expected}")
        aligned = {name for name, _ in row_arrays(self.meta)} - {name for name, _ in TOKEN_ARRAYS}
        for name, _ in row_arrays(self.meta):
            if name in aligned and name not in self.group:
                raise damaged(self.path, f"array {name!r} of an aligned store is missing")
            if name in self.group:
                a = self.group[name]
                if not isinstance(a, zarr.Array) or a.ndim != 1 or a.shape[0] < self.n_tokens \
                        or not np.issubdtype(a.dtype, np.integer):
                    shape = tuple(a.shape) if isinstance(a, zarr.Array) else "a group"
                    raise damaged(self.path, f"array {name!r} is {shape} {getattr(a, 'dtype', '')}, "
                                             f"not {self.n_tokens} integer rows")
        for s in self.sources:
            missing, wrong = bad_chunk_files(self.path, self.arrays[s.name], self.n_tokens)
            if missing:
                raise damaged(self.path, f"{len(missing)} chunk file(s) of array 'acts/{s.name}' are missing "
                                         f"(first: {missing[0]!r}); its rows would read as zeros")
            if wrong:
                raise damaged(self.path, f"{len(wrong)} chunk file(s) of array 'acts/{s.name}' have the wrong "
                                         f"size, e.g. truncated (first: {wrong[0]!r})")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise BadInput(f"source {name!r} is not in {str(self.path)!r}; it has: {', '.join(self.names)}")

    @property
    def chunk_rows(self) -> int:
        return int(next(iter(self.arrays.values())).chunks[0])

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_rows)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one source as float32, shape (rows, d)."""
        stop = min(stop, self.n_tokens)
        return decode_rows(self.read_stored(name, start, stop))

    def read_stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one source as stored; a chunk that cannot be decoded is a BadInput."""
        return read_checked(self.path, self.arrays[name], slice(start, min(stop, self.n_tokens)))

    def read_rows(self, start: int, stop: int, names=None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of several sources, read together."""
        return {n: self.read(n, start, stop) for n in (names or self.names)}

    def read_chunk(self, index: int, names=None) -> dict[str, np.ndarray]:
        start = index * self.chunk_rows
        return self.read_rows(start, start + self.chunk_rows, names)

    def token_arrays(self) -> dict[str, np.ndarray] | None:
        """tokens, sequence and position for the committed rows, or None if absent."""
        if not all(k in self.group for k in ("tokens", "sequence", "position")):
            return None
        return {k: read_checked(self.path, self.group[k], slice(0, self.n_tokens))
                for k in ("tokens", "sequence", "position")}

    @property
    def alignment(self) -> dict | None:
        """attrs["xc"]["alignment"] of a store of models with different tokenizers (xc harvest --align)."""
        return self.meta.get("alignment")

    def aligned_arrays(self) -> dict[str, np.ndarray]:
        """document, char_start, char_end and aligned/<model>/{tokens,position} for the committed rows."""
        if self.alignment is None:
            raise BadInput(f"store {str(self.path)!r} is not aligned: its models share one tokenizer")
        return {name: read_checked(self.path, self.group[name], slice(0, self.n_tokens))
                for name, _ in aligned_arrays(self.alignment["models"])}

    def stored_stats(self, name: str) -> dict | None:
        """The statistics recorded for a source, if they are whole and of the committed rows; else None
        (they are a cache: anything else in their place is recomputed, not trusted)."""
        recorded = self.meta.get("stats")
        stored = recorded.get(name) if isinstance(recorded, dict) else None
        if not isinstance(stored, dict) or stored.get("count") != self.n_tokens:
            return None
        mean, norm = stored.get("mean"), stored.get("mean_sq_norm")
        if not (mean == f"stats/{name}/mean" and isinstance(norm, (int, float)) and not isinstance(norm, bool)
                and math.isfinite(norm)):
            return None
        try:
            return stored if isinstance(self.group[mean], zarr.Array) else None
        except (ValueError, TypeError, KeyError):  # absent, or its zarr.json damaged: recompute
            return None

    def stats(self, name: str) -> dict:
        """count, mean (d,) and mean squared norm of one source; computed if not stored."""
        stored = self.stored_stats(name)
        if stored is not None:
            mean = np.asarray(read_checked(self.path, self.group[stored["mean"]], slice(None)), dtype=np.float64)
            return {"count": self.n_tokens, "mean": mean, "mean_sq_norm": float(stored["mean_sq_norm"])}
        return compute_stats(self, name)

    def nbytes_on_disk(self) -> int:
        if remote.is_url(self.path):
            return int(self.path.fs().du(self.path.key))
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def summary(self) -> dict:
        """What `xc info` shows: sources, size, dtype, layout and completeness."""
        first = next(iter(self.arrays.values()))
        codec = self.meta.get("codec") or ", ".join(type(c).__name__ for c in first.compressors) or "none"
        return {
            "path": str(self.path), "complete": self.complete, "n_tokens": self.n_tokens, "dtype": self.dtype,
            "chunk_rows": self.chunk_rows, "codec": codec, "bytes_on_disk": self.nbytes_on_disk(),
            "context_length": self.meta.get("context_length"), "dataset": self.meta.get("dataset"),
            "tokenizer": self.meta.get("tokenizer"), "created_by": self.meta.get("created_by"),
            "has_stats": all(self.stored_stats(n) is not None for n in self.names),
            "has_token_arrays": all(k in self.group for k in ("tokens", "sequence", "position")),
            "sources": [s.to_json() for s in self.sources],
            **({"alignment": self.alignment} if self.alignment is not None else {}),
        }


def compute_stats(store: ActivationStore, name: str, stop: int | None = None) -> dict:
    """Exact statistics by one pass over whole chunks, in row order (so reruns agree bit for bit)."""
    acc = StatsAccumulator(store.source(name).d)
    stop = store.n_tokens if stop is None else stop
    for start in range(0, stop, store.chunk_rows):
        acc.add(store.read(name, start, min(start + store.chunk_rows, stop)))
    return acc.result()


class StatsAccumulator:
    """Running count, sum and sum of squared norms, in float64."""

    def __init__(self, d: int):
        self.count, self.sum, self.sum_sq_norm = 0, np.zeros(d, dtype=np.float64), 0.0

    def add(self, rows: np.ndarray) -> None:
        rows64 = rows.astype(np.float64)
        self.count += rows.shape[0]
        self.sum += rows64.sum(axis=0)
        self.sum_sq_norm += float(np.einsum("ij,ij->", rows64, rows64))

    def result(self) -> dict:
        n = max(self.count, 1)
        return {"count": self.count, "mean": self.sum / n, "mean_sq_norm": self.sum_sq_norm / n}


def open_store(path) -> ActivationStore:
    path = store_path(path)
    try:
        found = path.exists()
    except OSError as e:  # an object store that cannot be reached (endpoint, credentials)
        raise BadInput(f"store {str(path)!r} cannot be reached ({type(e).__name__}: {str(e)[:160]})") from None
    if not found:
        raise BadInput(f"store {str(path)!r} does not exist")
    try:
        group = zarr.open_group(remote.zarr_target(path, read_only=True), mode="r")
    except Exception as e:  # zarr raises several types for "not a group"
        raise BadInput(f"{str(path)!r} is not a Zarr v3 activation store ({type(e).__name__})") from e
    try:
        return ActivationStore(path, group)
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # an array's zarr.json: not JSON, not Zarr
        raise damaged(path, f"its Zarr metadata cannot be read ({type(e).__name__}: {str(e)[:120]})") from e


def _create(path: Path, sources: list[Source], meta: dict | None, dtype: str, chunk_rows: int, codec: str,
            rows: int, **extra_meta) -> zarr.Group:
    """A new, empty store whose arrays have `rows` rows (none committed)."""
    group = zarr.open_group(remote.zarr_target(path), mode="w")
    compressors = _compressors(codec)
    for s in sources:
        group.create_array(f"acts/{s.name}", shape=(rows, s.d), chunks=(chunk_rows, s.d),
                           dtype=STORAGE_DTYPES[dtype], compressors=compressors, fill_value=0,
                           dimension_names=(ROW_DIM, width_dim(s.name)), config=STORE_EVERY_CHUNK)
        group.create_array(f"stats/{s.name}/mean", shape=(s.d,), chunks=(s.d,),
                           dtype="float64", compressors=None, fill_value=0.0, dimension_names=(width_dim(s.name),))
    for name, np_dtype in row_arrays(meta or {}):
        group.create_array(name, shape=(rows,), chunks=(chunk_rows,), dtype=np_dtype,
                           compressors=None, fill_value=0, dimension_names=(ROW_DIM,))
    group.attrs["xc"] = {
        "format": FORMAT, "version": VERSION, "sources": [s.to_json() for s in sources],
        "n_tokens": 0, "complete": False, "dtype": dtype, "codec": codec,
        "created_by": f"xc {__version__}", **(meta or {}), **extra_meta,
    }
    return group


class StoreWriter:
    """Append token rows to a new or partly written store, chunk by chunk.

    Rows are buffered until a whole chunk is ready; each flush writes the
    activations, the token arrays and the statistics, then commits `n_tokens`
    in the attributes. A killed writer leaves every committed row valid.
    """

    def __init__(self, path, sources: list[Source], meta: dict | None = None, *, dtype: str = "float16",
                 chunk_rows: int = DEFAULT_CHUNK_ROWS, codec: str = DEFAULT_CODEC, resume: bool = False):
        if dtype not in STORAGE_DTYPES:
            raise BadInput(f"dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
        validate_source_names(sources)
        self.path, self.sources, self.dtype, self.chunk_rows = store_path(path), sources, dtype, chunk_rows
        if resume:
            self.group = zarr.open_group(remote.zarr_target(self.path), mode="r+")
            self.meta = dict(self.group.attrs["xc"])
            self.meta.pop("stats", None)  # recomputed below, recorded again by close()
            self.dtype = self.meta["dtype"]  # the store's, not the default: a float32 store stays float32
            self.chunk_rows = int(self.group["acts"][sources[0].name].chunks[0])
            self.n_tokens = int(self.meta["n_tokens"])
            store = ActivationStore(self.path, self.group)
            self.stats = {}
            for s in sources:  # recompute from committed rows: exact and immune to torn writes
                acc = StatsAccumulator(s.d)
                for start in range(0, self.n_tokens, self.chunk_rows):
                    acc.add(store.read(s.name, start, min(start + self.chunk_rows, self.n_tokens)))
                self.stats[s.name] = acc
        else:
            self.group = _create(self.path, sources, meta, dtype, chunk_rows, codec, rows=0)
            self.meta = dict(self.group.attrs["xc"])
            self.n_tokens = 0
            self.stats = {s.name: StatsAccumulator(s.d) for s in sources}
        self.row_names = [name for name, _ in row_arrays(self.meta)]
        self._buffer: list[tuple[dict, dict]] = []
        self._buffered = 0
        self._arrays: dict[str, zarr.Array] = {}

    def append(self, acts: dict[str, np.ndarray], tokens=None, sequence=None, position=None, **aligned) -> None:
        """Add rows: acts maps every source name to (rows, d) float32/float16 arrays; an aligned store
        also takes its aligned row arrays by name (xcli.data.store.aligned_arrays)."""
        rows = next(iter(acts.values())).shape[0]
        ids = {"tokens": tokens, "sequence": sequence, "position": position, **aligned}
        unknown = set(ids) - set(self.row_names)
        if unknown:
            raise ValueError(f"store {str(self.path)!r} has no row arrays {sorted(unknown)}")
        ids = {k: (np.zeros(rows) if ids.get(k) is None else np.asarray(ids[k])) for k in self.row_names}
        self._buffer.append((acts, ids))
        self._buffered += rows
        while self._buffered >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _take(self, rows: int):
        """Pop exactly `rows` buffered rows as concatenated arrays."""
        acts = {s.name: np.concatenate([b[0][s.name] for b in self._buffer]) for s in self.sources}
        ids = {k: np.concatenate([b[1][k] for b in self._buffer]) for k in self.row_names}
        rest = ({n: a[rows:] for n, a in acts.items()}, {k: a[rows:] for k, a in ids.items()})
        self._buffer = [rest] if self._buffered > rows else []
        self._buffered -= rows
        return {n: a[:rows] for n, a in acts.items()}, {k: a[:rows] for k, a in ids.items()}

    def _encode(self, values: np.ndarray) -> np.ndarray:
        return encode_rows(values, self.dtype)

    def _array(self, name: str):
        """Open arrays once: every lookup through the group reads metadata from disk."""
        if name not in self._arrays:
            self._arrays[name] = self.group[name].with_config(STORE_EVERY_CHUNK)
        return self._arrays[name]

    def _grow(self, name: str, stop: int) -> zarr.Array:
        """The array, with room for `stop` rows; capacity doubles so that resizes stay rare.

        Rows past `n_tokens` are not part of the store; close() trims them.
        """
        array = self._array(name)
        if array.shape[0] < stop:
            capacity = max(stop, 2 * array.shape[0], self.chunk_rows)
            array.resize((-(-capacity // self.chunk_rows) * self.chunk_rows, *array.shape[1:]))
        return array

    def _flush(self, rows: int) -> None:
        if rows == 0:
            return
        acts, ids = self._take(rows)
        start, stop = self.n_tokens, self.n_tokens + rows
        writes = []
        for s in self.sources:
            encoded = self._encode(acts[s.name])
            writes.append((self._grow(f"acts/{s.name}", stop), encoded))
            # Statistics of what was stored (after rounding), so readers and writers agree.
            self.stats[s.name].add(decode_rows(encoded))
        for name, values in ids.items():
            array = self._grow(name, stop)
            writes.append((array, values.astype(array.dtype)))

        async def write_all():  # one round trip to zarr's event loop instead of one per array
            await asyncio.gather(*(a.async_array.setitem(slice(start, stop), v) for a, v in writes))

        zarr_sync(write_all())
        self.n_tokens = stop
        self._commit()

    def _commit(self, complete: bool = False) -> None:
        """Record n_tokens: the commit point. Statistics are recorded only by close()."""
        self.meta.update(n_tokens=self.n_tokens, complete=complete)
        self.group.attrs["xc"] = self.meta

    def close(self, complete: bool = True, **extra_meta) -> None:
        """Write the last partial chunk, trim arrays to the committed rows, store statistics, mark completeness."""
        self._flush(self._buffered)
        for s in self.sources:
            self._array(f"acts/{s.name}").resize((self.n_tokens, s.d))
        for name in self.row_names:
            self._array(name).resize((self.n_tokens,))
        stats = {}
        for s in self.sources:
            result = self.stats[s.name].result()
            self._array(f"stats/{s.name}/mean")[:] = result["mean"]
            stats[s.name] = {"count": result["count"], "mean_sq_norm": result["mean_sq_norm"],
                             "mean": f"stats/{s.name}/mean"}
        self.meta.update(stats=stats, **extra_meta)
        self._commit(complete=complete)
        remove_progress(self.path)  # left by a conversion to a sharded store that was killed


# Several writers: xc harvest under torchrun. Each chunk has exactly one writer (Zarr
# chunks must not be written concurrently); a chunk is committed by its record file.

def _record_path(path: Path, index: int) -> Path:
    return store_path(path) / PROGRESS / f"chunk-{index}.npz"


def _load_record(path, index: int):
    """A chunk's record (np.load's NpzFile), from a file or an object."""
    record = _record_path(path, index)
    if remote.is_url(record):
        return np.load(io.BytesIO(record.fs().cat_file(record.key)))
    return np.load(record)


def is_sharded(path) -> bool:
    """Whether the store at `path` is being written chunk by chunk by several processes."""
    try:
        return bool(zarr.open_group(remote.zarr_target(path, read_only=True), mode="r").attrs.get("xc", {})
                    .get("sharded"))
    except Exception:  # absent, or not a store: not ours to judge here
        return False


def committed_chunks(path) -> set[int]:
    """Indices of the chunks of a sharded store whose records exist."""
    try:
        if remote.is_url(path):
            folder = store_path(path) / PROGRESS
            folder.fs().invalidate_cache()
            names = [name.rsplit("/", 1)[-1] for name in folder.fs().ls(folder.key, detail=False)]
        else:
            names = os.listdir(Path(path) / PROGRESS)
    except FileNotFoundError:  # none yet
        return set()
    return {int(n[6:-4]) for n in names if n.startswith("chunk-") and n.endswith(".npz")}


def create_sharded(path, sources: list[Source], meta: dict | None = None, *, dtype: str = "float16",
                   chunk_rows: int = DEFAULT_CHUNK_ROWS, codec: str = DEFAULT_CODEC) -> None:
    """A new store for ChunkWriters (no rows committed, n_tokens 0 until finish_sharded)."""
    if dtype not in STORAGE_DTYPES:
        raise BadInput(f"dtype {dtype!r} is not supported; use one of {', '.join(STORAGE_DTYPES)}")
    validate_source_names(sources)
    _create(store_path(path), sources, meta, dtype, chunk_rows, codec, rows=SHARDED_ROWS, sharded=True)
    if not remote.is_url(path):  # an object store has no folders: the records' keys make it
        (Path(path) / PROGRESS).mkdir()


def make_sharded(path) -> None:
    """Prepare an incomplete store for ChunkWriters; a store from StoreWriter keeps its committed rows.

    Idempotent, so a conversion that was killed is simply done again.
    """
    path = store_path(path)
    group = zarr.open_group(remote.zarr_target(path), mode="r+")
    meta = dict(group.attrs["xc"])
    if not remote.is_url(path):
        (path / PROGRESS).mkdir(exist_ok=True)
    if not meta.get("sharded"):
        store = ActivationStore(path, group)
        if store.n_tokens % store.chunk_rows:
            raise XcError(f"store {str(path)!r} holds a partial chunk but is not complete")
        writer = ChunkWriter(path, group)
        recorded = writer.committed()
        for index in range(store.n_chunks):  # every committed chunk gets its record
            if index not in recorded:
                rows = {n: store.group[f"acts/{n}"][index * store.chunk_rows:(index + 1) * store.chunk_rows]
                        for n in store.names}
                writer.record(index, rows)
        meta.pop("stats", None)
        meta.update(n_tokens=0, complete=False, sharded=True)
        group.attrs["xc"] = meta  # the commit of the conversion
    for array in _row_arrays(group, meta):  # room for every writer, without resizes while they write
        if array.shape[0] < SHARDED_ROWS:
            array.resize((SHARDED_ROWS, *array.shape[1:]))


def _row_arrays(group: zarr.Group, meta: dict) -> list[zarr.Array]:
    names = [f"acts/{s['name']}" for s in meta["sources"]] + [name for name, _ in TOKEN_ARRAYS]
    return [group[name] for name in names]


class ChunkWriter:
    """Writes whole chunks at their places in a store that several processes write at once.

    Rows of chunk i are rows [i * chunk_rows, (i + 1) * chunk_rows) of the store. After a chunk's
    rows are written, its record (row count, per-source sum and sum of squared norms, float64)
    is saved as progress/chunk-i.npz under a temporary name and renamed: the commit. A killed
    writer leaves every recorded chunk valid; finish_sharded merges the records.
    """

    def __init__(self, path, group: zarr.Group | None = None):
        self.path = store_path(path)
        self.group = group if group is not None else zarr.open_group(remote.zarr_target(self.path), mode="r+")
        self.meta = dict(self.group.attrs["xc"])
        self.sources = [Source.from_json(s) for s in self.meta["sources"]]
        self.dtype = self.meta["dtype"]
        self.arrays = dict(zip([f"acts/{s.name}" for s in self.sources] + [n for n, _ in TOKEN_ARRAYS],
                               [a.with_config(STORE_EVERY_CHUNK) for a in _row_arrays(self.group, self.meta)]))
        self.chunk_rows = int(self.arrays[f"acts/{self.sources[0].name}"].chunks[0])

    def committed(self) -> set[int]:
        return committed_chunks(self.path)

    def write(self, index: int, acts: dict[str, np.ndarray], ids: dict[str, np.ndarray]) -> None:
        """Write chunk `index` (all its rows, or the store's last rows) and commit it."""
        rows = next(iter(acts.values())).shape[0]
        if not 0 < rows <= self.chunk_rows:
            raise ValueError(f"a chunk holds 1 to {self.chunk_rows} rows, not {rows}")
        start = index * self.chunk_rows
        encoded = {s.name: encode_rows(acts[s.name], self.dtype) for s in self.sources}
        writes = [(self.arrays[f"acts/{n}"], values) for n, values in encoded.items()]
        writes += [(self.arrays[name], ids[name].astype(dtype)) for name, dtype in TOKEN_ARRAYS]

        async def write_all():
            await asyncio.gather(*(a.async_array.setitem(slice(start, start + rows), v) for a, v in writes))

        zarr_sync(write_all())
        self.record(index, encoded)

    def record(self, index: int, stored: dict[str, np.ndarray]) -> None:
        """Commit chunk `index` whose stored rows (in the storage dtype) are `stored`."""
        sums, sq_norms = {}, []
        for i, s in enumerate(self.sources):
            acc = StatsAccumulator(s.d)
            acc.add(decode_rows(stored[s.name]))  # the stored values, as StoreWriter counts them
            sums[f"sum_{i}"] = acc.sum
            sq_norms.append(acc.sum_sq_norm)
        count = next(iter(stored.values())).shape[0]
        final = _record_path(self.path, index)
        if remote.is_url(final):  # one PUT: the object is whole or absent, so no rename is needed
            buffer = io.BytesIO()
            np.savez(buffer, count=np.int64(count), sum_sq_norm=np.array(sq_norms), **sums)
            final.fs().pipe_file(final.key, buffer.getvalue())
            return
        temporary = final.with_name(f".{final.name}.{os.getpid()}")
        with open(temporary, "wb") as handle:
            np.savez(handle, count=np.int64(count), sum_sq_norm=np.array(sq_norms), **sums)
        os.replace(temporary, final)


def finish_sharded(path, n_tokens: int, **extra_meta) -> None:
    """Finish a store written by ChunkWriters: check that its chunks are exactly those of n_tokens rows,
    merge their statistics in chunk order (as StoreWriter adds them: the same figures), trim the
    arrays, and commit. Called by one process, after every writer is done."""
    path = store_path(path)
    writer = ChunkWriter(path)
    chunk_rows = writer.chunk_rows
    n_chunks = -(-n_tokens // chunk_rows)
    committed = writer.committed()
    if any(index >= n_chunks for index in committed):
        raise BadInput(f"the corpus now yields fewer tokens than {str(path)!r} already holds; "
                       f"it must not change between runs")
    missing = sorted(set(range(n_chunks)) - committed)
    if missing:
        raise XcError(f"{len(missing)} chunks of {str(path)!r} were not written (first: {missing[0]}); "
                      f"continue with --resume")
    stats = {s.name: StatsAccumulator(s.d) for s in writer.sources}
    for index in range(n_chunks):
        with _load_record(path, index) as record:
            expected = min(chunk_rows, n_tokens - index * chunk_rows)
            if int(record["count"]) != expected:
                raise BadInput(f"chunk {index} of {str(path)!r} holds {int(record['count'])} rows where the "
                               f"corpus now gives {expected}; it must not change between runs")
            for i, s in enumerate(writer.sources):
                acc = stats[s.name]
                acc.count += expected
                acc.sum += record[f"sum_{i}"]
                acc.sum_sq_norm += float(record["sum_sq_norm"][i])

    async def trim():  # only the shape changes: no chunk lies beyond n_tokens
        await asyncio.gather(*(a.async_array.resize((n_tokens, *a.shape[1:]), delete_outside_chunks=False)
                               for a in writer.arrays.values()))

    zarr_sync(trim())
    recorded = {}
    for s in writer.sources:
        result = stats[s.name].result()
        writer.group[f"stats/{s.name}/mean"][:] = result["mean"]
        recorded[s.name] = {"count": result["count"], "mean_sq_norm": result["mean_sq_norm"],
                            "mean": f"stats/{s.name}/mean"}
    meta = dict(writer.meta)
    meta.pop("sharded", None)
    meta.update(n_tokens=n_tokens, complete=True, stats=recorded, **extra_meta)
    writer.group.attrs["xc"] = meta
    remove_progress(path)


def remove_progress(path) -> None:
    """Delete the commit records once the store is complete (also those a kill left behind)."""
    if remote.is_url(path):
        folder = store_path(path) / PROGRESS
        try:
            folder.fs().rm(folder.key, recursive=True)
        except FileNotFoundError:
            pass
        folder.fs().invalidate_cache()
        return
    shutil.rmtree(Path(path) / PROGRESS, ignore_errors=True)
