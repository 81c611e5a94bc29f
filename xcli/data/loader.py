"""Streaming training batches out of one or more activation stores.

The data path, with memory bounded by the shuffle buffer, not by the store:

    store chunks --(shuffled chunk order, per epoch)--> windows of W whole chunks
      --(rows permuted inside the window)--> batches --(background thread)--> trainer

Reads are whole chunks (random rows from a chunked store would read each chunk
many times over), all sources of a row are read together, and a few chunks spread
evenly over the store are held out for evaluation. The order is a pure function of
(seed, epoch, window), so a run restarted at a `Position` sees exactly the batches
an uninterrupted run would have seen.
"""

import hashlib
import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from xcli import console, remote
from xcli.data.store import ActivationStore, open_store, read_checked
from xcli.errors import BadInput
from xcli.source import Source


class StoreSet:
    """Several stores whose rows line up (same tokens), read as one table of sources.

    One store may hold several models' sources (harvested together), or each model
    may have its own store; both look the same from here.
    """

    def __init__(self, paths, allow_incomplete: bool = False):
        if not paths:
            raise BadInput("give at least one activation store")
        self.stores: list[ActivationStore] = [open_store(p) for p in paths]
        for store in self.stores:
            if not store.complete and not allow_incomplete:
                raise BadInput(f"store {str(store.path)!r} is incomplete ({store.n_tokens} rows committed); "
                               f"finish it with 'xc harvest --resume' or pass --allow-incomplete")
            if store.n_tokens == 0:
                raise BadInput(f"store {str(store.path)!r} holds no rows")
        self.by_source: dict[str, ActivationStore] = {}
        for store in self.stores:
            for name in store.names:
                if name in self.by_source:
                    raise BadInput(f"source {name!r} is in both {str(self.by_source[name].path)!r} and "
                                   f"{str(store.path)!r}; source names must be unique across stores")
                self.by_source[name] = store
        lengths = {str(s.path): s.n_tokens for s in self.stores}
        if len(set(lengths.values())) > 1 and not allow_incomplete:
            raise BadInput(f"the stores do not line up: they hold different numbers of rows ({lengths}); "
                           f"harvest every model on the same text")
        # Incomplete stores are prefixes of the same harvest: train on the common prefix.
        self.n_tokens = min(lengths.values())
        self._chunk_rows = self.stores[0].chunk_rows
        self.tokens_sha256 = self._check_tokens()

    def _check_tokens(self) -> str | None:
        """Compare token ids across stores chunk by chunk (flat memory); return their digest."""
        with_tokens = [s for s in self.stores if "tokens" in s.group]
        digest = hashlib.sha256()
        step = 1 << 20
        for start in range(0, self.n_tokens, step):
            stop = min(start + step, self.n_tokens)
            blocks = [np.asarray(read_checked(s.path, s.group["tokens"], slice(start, stop)), dtype=np.int32)
                      for s in with_tokens]
            for store, block in zip(with_tokens[1:], blocks[1:]):
                if not np.array_equal(block, blocks[0]):
                    row = start + int(np.argmax(block != blocks[0]))
                    raise BadInput(f"the stores do not line up: {str(with_tokens[0].path)!r} and "
                                   f"{str(store.path)!r} hold different tokens (first at row {row})")
            if blocks:
                digest.update(blocks[0].tobytes())
        return digest.hexdigest() if with_tokens else None

    @property
    def sources(self) -> list[Source]:
        return [source for store in self.stores for source in store.sources]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk as training reads them: the store's chunk, or a block of it (`hold_out`)."""
        return self._chunk_rows

    def hold_out(self, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(training chunks, held-out chunks), as `train_eval_chunks`.

        A store too small to hold out a whole chunk (a 3,000-token harvest is one chunk) is read in
        blocks instead: its chunk size is halved, down to MIN_BLOCK_ROWS, until about `eval_fraction`
        of its rows can be held out. The blocks depend only on the store and the fraction, so
        training, its resume and `xc eval` hold out the same rows."""
        n_eval = max(1, round(eval_fraction * self.n_chunks))
        if eval_fraction > 0 and n_eval >= self.n_chunks:
            store_chunk, wanted = self._chunk_rows, math.ceil(1 / eval_fraction)
            while self.n_chunks < wanted and self._chunk_rows // 2 >= MIN_BLOCK_ROWS:
                self._chunk_rows //= 2
            if self._chunk_rows != store_chunk:
                console.info(f"the store has {-(-self.n_tokens // store_chunk)} chunk(s) of {store_chunk} rows: "
                             f"holding out blocks of {self._chunk_rows} rows instead of whole chunks")
        return train_eval_chunks(self.n_chunks, eval_fraction)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_tokens // self.chunk_rows)

    def chunk_range(self, index: int) -> tuple[int, int]:
        start = int(index) * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n_tokens)

    def read_chunk(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        """All requested sources of one chunk's rows, as float32."""
        start, stop = self.chunk_range(index)
        return {n: self.by_source[n].read(n, start, stop) for n in names}

    def read_chunk_stored(self, index: int, names: list[str]) -> dict[str, np.ndarray]:
        """One chunk's rows as stored (float16, float32, or bfloat16 bits as uint16): half the bytes
        of float32 to shuffle and to copy to a GPU, which widens them faster than numpy."""
        start, stop = self.chunk_range(index)
        return {n: self.by_source[n].read_stored(n, start, stop) for n in names}

    def stored_dtype(self, name: str) -> np.dtype:
        return self.by_source[name].arrays[name].dtype

    def stats(self, name: str) -> dict:
        return self.by_source[name].stats(name)

    def identity(self) -> list[dict]:
        """What a checkpoint records about the data it was trained on."""
        out = []
        for s in self.stores:
            keep = {k: s.meta[k] for k in ("dataset", "tokenizer", "context_length", "created_by") if k in s.meta}
            out.append({"path": remote.resolved(s.path), "n_tokens": s.n_tokens, "complete": s.complete,
                        "sources": s.names, "tokens_sha256": self.tokens_sha256, **keep})
        return out


REMOTE_PARALLEL_READS = 16  # chunk reads in flight from a store at a URL (BatchStream._read_chunks)
MIN_BLOCK_ROWS = 64  # the smallest unit a small store is held out in (StoreSet.hold_out)


def train_eval_chunks(n_chunks: int, eval_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(training chunks, held-out chunks). Held-out chunks are spread evenly over the store
    and do not depend on the seed, so runs with different seeds are evaluated on the same rows."""
    n_eval = 0 if eval_fraction <= 0 else max(1, round(eval_fraction * n_chunks))
    if n_eval >= n_chunks:
        raise BadInput(f"--eval-fraction {eval_fraction} holds out {n_eval} of the store's {n_chunks} chunks, "
                       f"leaving none to train on; lower it or use a bigger store")
    held = np.unique(((np.arange(n_eval) + 0.5) * n_chunks / max(n_eval, 1)).astype(np.int64))
    return np.setdiff1d(np.arange(n_chunks), held), held


def chunk_order(train_chunks: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training chunks."""
    return np.random.default_rng([seed, 1, epoch]).permutation(train_chunks)


@dataclass(frozen=True)
class Position:
    """Where the stream stands: `row` rows of epoch `epoch` have been consumed."""

    epoch: int = 0
    row: int = 0


@dataclass
class Batch:
    data: dict[str, torch.Tensor]
    """Source name -> (rows, d) tensor in the store's dtype (float16, bfloat16 or float32; widen with
    .float() after moving it to the device), on the CPU, pinned when bound for CUDA: this rank's rows."""
    after: Position
    """The position just after this batch (the next epoch's start if it ended an epoch)."""
    rows: int
    """Rows of the whole batch, over all ranks (this rank holds the share its chunks supply)."""
    index: np.ndarray | None = None
    """Data-parallel: the places of this rank's rows in the whole batch (None in one process)."""


class BatchStream:
    """Training batches in a deterministic shuffled order, read ahead by a background thread.

    With `world` > 1 (data-parallel training) the batches are the same as in one
    process, but rank r reads only the chunks at positions i ≡ r (mod world) of each
    shuffle window and keeps only the rows of each batch that came from them: the
    ranks read disjoint chunks, their shares of a batch add up to the one-process
    batch, and the order does not depend on the number of ranks (a run can resume
    on another number of GPUs).
    """

    def __init__(self, stores: StoreSet, names: list[str], train_chunks: np.ndarray, batch_size: int,
                 seed: int, shuffle_rows: int, prefetch: int = 4, pin_memory: bool = False,
                 rank: int = 0, world: int = 1):
        self.stores, self.names, self.train_chunks = stores, list(names), np.asarray(train_chunks)
        self.batch_size, self.seed, self.prefetch, self.pin_memory = batch_size, seed, prefetch, pin_memory
        self.rank, self.world = rank, world
        # Chunks read at once: one GET to an object store waits tens of milliseconds, so a window's chunks
        # are fetched in parallel there (benchmarks/object_store_loader.py); local disk reads one at a time.
        remote_stores = any(remote.is_url(store.path) for store in stores.stores)
        self.parallel_reads = REMOTE_PARALLEL_READS if remote_stores else 1
        self.window = max(1, -(-shuffle_rows // stores.chunk_rows))  # whole chunks per shuffle window
        sizes = [stores.chunk_range(int(c)) for c in self.train_chunks]
        self.chunk_sizes = {int(c): stop - start for c, (start, stop) in zip(self.train_chunks, sizes)}
        self.rows_per_epoch = sum(self.chunk_sizes.values())

    # -- the order, as pure functions of the position -------------------------------
    def windows(self, epoch: int) -> list[np.ndarray]:
        order = chunk_order(self.train_chunks, self.seed, epoch)
        return [order[i:i + self.window] for i in range(0, len(order), self.window)]

    def load_window(self, epoch: int, index: int, chunks: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """This rank's rows of a window, in the window's shuffled order, and their places in that
        order (sorted). Rows go straight to their final places: the window is held once, plus one
        chunk in flight."""
        sizes = [self.chunk_sizes[int(c)] for c in chunks]
        perm = np.random.default_rng([self.seed, 2, epoch, index]).permutation(sum(sizes))
        dest = np.empty(len(perm), dtype=np.int64)
        dest[perm] = np.arange(len(perm))  # row j of the window goes to place dest[j]
        starts = np.cumsum([0, *sizes])
        mine = [i for i in range(len(chunks)) if i % self.world == self.rank]
        places = np.concatenate([dest[starts[i]:starts[i + 1]] for i in mine]) if mine else dest[:0]
        slot = np.empty(len(places), dtype=np.int64)
        slot[np.argsort(places, kind="stable")] = np.arange(len(places))  # where each local row goes
        width = {s.name: s.d for s in self.stores.sources}
        out = {n: np.empty((len(places), width[n]), dtype=self.stores.stored_dtype(n)) for n in self.names}
        done = 0
        for i, data in zip(mine, self._read_chunks([int(chunks[i]) for i in mine])):
            for n in self.names:
                out[n][slot[done:done + sizes[i]]] = data[n]
            done += sizes[i]
        return np.sort(places), out

    def _read_chunks(self, chunks: list[int]) -> Iterator[dict[str, np.ndarray]]:
        """The chunks' stored rows, in order; at most `parallel_reads` chunks in flight beyond the one taken."""
        if self.parallel_reads <= 1:
            for c in chunks:
                yield self.stores.read_chunk_stored(c, self.names)
            return
        with ThreadPoolExecutor(self.parallel_reads, thread_name_prefix="xc-read") as pool:
            pending = deque()
            for c in chunks:
                pending.append(pool.submit(self.stores.read_chunk_stored, c, self.names))
                if len(pending) >= self.parallel_reads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def batches(self, position: Position = Position()) -> Iterator[Batch]:
        """Batches from `position` on, forever (epoch after epoch); synchronous."""
        epoch, skip = position.epoch, position.row
        while True:
            pieces, start, loaded = [], skip, 0  # start: place of the next batch's first row in the epoch
            windows = self.windows(epoch)
            for index, chunks in enumerate(windows):
                rows = sum(self.chunk_sizes[int(c)] for c in chunks)
                if loaded + rows <= skip:  # wholly before the resume point: not read at all
                    loaded += rows
                    continue
                places, data = self.load_window(epoch, index, chunks)
                places += loaded
                first = int(np.searchsorted(places, skip))
                pieces.append((places[first:], {n: a[first:] for n, a in data.items()}))
                loaded += rows
                last_window = index == len(windows) - 1
                while loaded - start >= self.batch_size or (last_window and loaded > start):
                    stop = min(start + self.batch_size, loaded)
                    places, batch, pieces = take_rows(pieces, stop)
                    if batch is None:  # none of this batch's rows came from this rank's chunks
                        batch = {n: np.empty((0, self.stores.by_source[n].source(n).d),
                                             dtype=self.stores.stored_dtype(n)) for n in self.names}
                    ended = stop == self.rows_per_epoch
                    yield Batch(self._tensors(batch), Position(epoch + 1, 0) if ended else Position(epoch, stop),
                                stop - start, places - start if self.world > 1 else None)
                    start = stop
            epoch, skip = epoch + 1, 0

    def _tensors(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        tensors = {n: as_tensor(np.ascontiguousarray(a)) for n, a in batch.items()}
        return {n: t.pin_memory() for n, t in tensors.items()} if self.pin_memory else tensors

    def prefetched(self, position: Position = Position()) -> "Prefetcher":
        return Prefetcher(self.batches(position), self.prefetch)


def as_tensor(rows: np.ndarray) -> torch.Tensor:
    """Stored rows as a tensor without a copy; bfloat16 bits (uint16) become a bfloat16 tensor."""
    tensor = torch.from_numpy(rows)
    return tensor.view(torch.bfloat16) if rows.dtype == np.uint16 else tensor


def take_rows(pieces: list[tuple[np.ndarray, dict[str, np.ndarray]]], stop: int):
    """Split the rows placed before `stop` off a list of (places, rows) blocks:
    (their places, the rows or None if there are none, the remaining pieces)."""
    taken, where, rest = [], [], []
    for places, data in pieces:
        cut = int(np.searchsorted(places, stop))
        if cut:
            taken.append({n: a[:cut] for n, a in data.items()})
            where.append(places[:cut])
        if cut < len(places):
            rest.append((places[cut:], {n: a[cut:] for n, a in data.items()}))
    places = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
    if len(taken) <= 1:
        return places, (taken[0] if taken else None), rest
    return places, {n: np.concatenate([t[n] for t in taken]) for n in taken[0]}, rest


class Prefetcher:
    """Run a batch iterator in a daemon thread, a few batches ahead; `close()` stops it.

    Reading and decoding chunks overlaps with the training step. Errors in the
    thread are re-raised in the consumer.
    """

    _DONE = object()

    def __init__(self, source: Iterator[Batch], depth: int):
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.waited = 0.0
        """Seconds the consumer has waited for a batch, the first one not counted: time its
        device may have sat idle because the store could not keep up."""
        self.served = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="xc-prefetch")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Batch]) -> None:
        try:
            for batch in source:
                if not self._put(batch):
                    return
            self._put(self._DONE)
        except BaseException as e:  # hand every failure to the consumer
            self._put(e)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        started = time.perf_counter()
        item = self.queue.get()
        if self.served:
            self.waited += time.perf_counter() - started
        self.served += 1
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def eval_batches(stores: StoreSet, names: list[str], eval_chunks: np.ndarray,
                 batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out rows in store order, one chunk at a time, in batches of at most batch_size."""
    for c in eval_chunks:
        data = stores.read_chunk(int(c), names)
        rows = len(next(iter(data.values())))
        for start in range(0, rows, batch_size):
            yield {n: torch.from_numpy(a[start:start + batch_size]) for n, a in data.items()}
