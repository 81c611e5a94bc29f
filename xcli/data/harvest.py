"""xc harvest: run models over a corpus and stream chosen activations into a store.

    config = HarvestConfig(models=("base=PATH", "chat=PATH"), data="corpus.txt",
                           output=Path("acts.zarr"), layers="6")
    harvest(config)  # -> Path("acts.zarr")

Every model sees the same token windows (xcli.data.corpus) and its activations are
caught by forward hooks (xcli.lm.sites). Rows of special tokens and padding are
dropped (unless asked), the rest are converted to the storage dtype on the
device, checked for overflow and handed to a writer thread, so that compression
and disk writes overlap the next forward pass. The store (xcli.data.store) commits
whole chunks; a killed run resumes with `resume=True` by recounting the rows it
already holds from the token ids alone and continuing from there with the same
batches, so that the result equals an uninterrupted run.

Under torchrun every rank runs `harvest`: the store's chunks are dealt to the ranks in
blocks, each rank computes and writes its own chunks (xcli.data.store.ChunkWriter), and rank 0
creates the store and finishes it (harvest_sharded). The store is the one a single
process writes, row for row.
"""

import itertools
import queue
import threading
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from xcli import console, files
from xcli.data import align
from xcli.data import store as st
from xcli.data.config import HarvestConfig, describe_data
from xcli.data.corpus import TOKENIZE_GROUP, Batch, Packing, _grouped, batches, check_data, read_documents, windows
from xcli.devices import resolve_device
from xcli.distributed import SINGLE, Comm, launched, local_device, process_group, together
from xcli.errors import BadInput, XcError
from xcli.lm.config import parse_layers
from xcli.lm.models import LoadedModel, context_limit, load_model, n_layers
from xcli.lm.sites import Catcher, resolve_sites
from xcli.source import is_plain_name, validate_source_names

DEFAULT_CONTEXT_LENGTH = 1024
STORAGE_TORCH = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
PROBE_TOKENS = 8
# Under torchrun, blocks of chunks of about this many batches go to the ranks in turn. A batch
# astride two blocks runs on both ranks, so this bounds the repeated work to about 1/16.
BATCHES_PER_BLOCK = 16
# --align warns when less of the text than this is in stored rows.
LOW_ALIGNMENT = 0.9


def existing_store_state(config: HarvestConfig) -> str:
    """'new', 'resume' or 'done' for the output; refuses what would clobber or mix runs."""
    out = config.output
    if not out.exists():
        files.check_output(out)  # the parent folder must exist
        return "new"
    if config.overwrite:
        files.check_replaceable(out, "store", [m.id for m in config.models] + [config.data])
        return "new"
    try:
        store = st.open_store(out)
        recorded = store.meta.get("harvest")
    except BadInput:
        recorded, store = None, None
    if recorded is None:
        raise BadInput(f"output {str(out)!r} already exists and is not a store from xc harvest; "
                       f"pass --overwrite to replace it")
    mine = config.identity()
    if "data_content" not in recorded:  # a store of an earlier xc, which recorded the corpus by path only
        mine.pop("data_content")
    differ = sorted(k for k in set(mine) | set(recorded) if mine.get(k) != recorded.get(k))
    if store.complete and not differ:
        return "done"
    if differ == ["data_content"]:
        raise BadInput(f"the corpus {config.data!r} changed since {str(out)!r} was written from it (its content "
                       f"differs); pass --overwrite to harvest it again, or restore the corpus")
    if differ:
        raise BadInput(f"output {str(out)!r} already exists, written with other arguments ({', '.join(differ)} "
                       f"differ); pass --overwrite to replace it")
    if not config.resume:
        held = (f"{len(st.committed_chunks(out))} chunks written" if store.meta.get("sharded")
                else f"{store.n_tokens} tokens")
        raise BadInput(f"output {str(out)!r} already exists and is incomplete ({held}); "
                       f"pass --resume to continue it or --overwrite to start again")
    return "resume"


def check_same_vocabulary(models: list[LoadedModel]) -> None:
    """Every model must read the same token ids the same way."""
    first = models[0]
    vocab = first.tokenizer.get_vocab()
    for other in models[1:]:
        theirs = other.tokenizer.get_vocab()
        if theirs != vocab:
            diff = sorted(set(vocab.items()) ^ set(theirs.items()), key=lambda kv: kv[1])
            example = ", ".join(repr(token) for token, _ in diff[:3])
            raise BadInput(f"models {first.spec.alias!r} and {other.spec.alias!r} have different tokenizers "
                           f"({len(diff)} vocabulary entries differ, e.g. {example}); "
                           f"crosscoding several models needs identical vocabularies, or --align to store "
                           f"only rows aligned by text")


def resolve_context_length(config: HarvestConfig, models: list[LoadedModel]) -> int:
    limits = [(m.spec.alias, limit) for m in models if (limit := context_limit(m.model))]
    if config.context_length is None:
        return min([DEFAULT_CONTEXT_LENGTH, *(limit for _, limit in limits)])
    for alias, limit in limits:
        if config.context_length > limit:
            raise BadInput(f"--context-length {config.context_length} is more than model {alias!r} "
                           f"accepts ({limit} positions)")
    return config.context_length


def resolve_store_dtype(config: HarvestConfig, models: list[LoadedModel]) -> str:
    if config.store_dtype != "auto":
        return config.store_dtype
    return "bfloat16" if any(m.dtype == torch.bfloat16 for m in models) else "float16"


class BackgroundWriter:
    """Calls `write` on a thread with the arguments of each put(), in order, so that disk writes
    overlap the next forward pass.

    The queue is short: the models wait for the disk rather than filling memory.
    """

    def __init__(self, write: Callable[..., None], depth: int = 2):
        self.write, self.error = write, None
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, name="xc-store-writer", daemon=True)
        self.thread.start()

    def _run(self):
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.write(*item)
                except BaseException as e:  # reported by the main thread
                    self.error = e

    def _check(self):
        if self.error is not None:
            raise self.error

    def put(self, *args):
        self._check()
        self.queue.put(args)

    def finish(self):
        """Wait until every queued row is written."""
        self.queue.put(None)
        self.thread.join()
        self._check()

    def abort(self):
        """Drop what is queued and wait for the write in progress, which keeps committed rows valid."""
        try:
            while True:
                self.queue.get_nowait()
        except queue.Empty:
            pass
        self.queue.put(None)
        self.thread.join()


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    array = tensor.numpy()
    return array.view(np.uint16) if array.dtype == np.int16 else array  # bfloat16 bits


def to_storage(acts: torch.Tensor, dtype: str, name: str, model_dtype: torch.dtype) -> torch.Tensor:
    """Rows in the storage dtype, on the CPU; overflow and non-finite values are errors, never stored."""
    stored = acts.to(STORAGE_TORCH[dtype])
    if not bool(torch.isfinite(stored).all()):
        if bool(torch.isfinite(acts).all()):
            peak = float(acts.abs().max())
            raise XcError(f"activations of {name} reach {peak:.4g}, beyond the {dtype} range; "
                          f"rerun with --store-dtype bfloat16 or float32 and --overwrite")
        raise XcError(f"the model gave non-finite activations at {name} (overflow in "
                      f"{str(model_dtype).removeprefix('torch.')}); rerun with --dtype float32 and --overwrite")
    if dtype == "bfloat16":
        stored = stored.view(torch.int16)  # numpy has no bfloat16: keep the bits
    return stored.cpu()


def probe_sources(models, catchers, batch, device) -> list[st.Source]:
    """Run a few tokens through each model to learn every site's width (and check the sites)."""
    length = min(PROBE_TOKENS, int(batch.mask[0].sum()))
    ids = torch.from_numpy(batch.ids[:1, :length]).to(device)
    mask = torch.ones_like(ids)
    sources = []
    for loaded, catcher in zip(models, catchers):
        widths = {name: int(t.shape[-1]) for name, t in catcher(ids, mask).items()}
        for site in catcher.sites:
            sources.append(st.Source(name=site.name, model=loaded.spec.alias, site=site.site, layer=site.layer,
                                     d=widths[site.name], revision=loaded.revision))
    return sources


def write_batches(writer: st.StoreWriter, batches: Iterator, batch_rows: Callable, config: HarvestConfig,
                  rows_called: str, seen: Callable | None = None) -> bool:
    """The writer loop of a one-process harvest (Run.stream, AlignedRun.stream): rows an earlier run wrote
    are recounted from the batches, not recomputed; the rest go to `writer` on a background thread, up to
    --tokens. True when the batches ran out before the budget. `batch_rows(batch)` gives the batch's row
    count and a function of (lo, hi) giving its rows' activations and row arrays; `seen(batch, stop)` is told
    of every batch read, with the number of its rows within the budget."""
    budget = config.tokens
    done = skip = writer.n_tokens
    background = BackgroundWriter(lambda acts, ids: writer.append(acts, **ids))
    bar = console.progress(total=budget, initial=done, unit="tok", unit_scale=True, desc="harvest")
    try:
        for batch in batches:
            if budget is not None and done >= budget:
                break
            n, take = batch_rows(batch)
            stop = n if budget is None else min(n, skip + budget - done)
            if seen is not None:
                seen(batch, stop)
            if skip >= n:
                skip -= n
                continue
            background.put(*take(skip, stop))
            bar.update(stop - skip)
            done += stop - skip
            skip = 0
        if skip:
            raise BadInput(f"the corpus now yields fewer {rows_called} than {str(config.output)!r} already "
                           f"holds; it must not change between runs")
        background.finish()
    except BaseException:
        background.abort()
        raise
    finally:
        bar.close()
    return budget is None or done < budget


@dataclass
class Run:
    """A harvest ready to stream: models loaded, sites hooked, the first batch read, widths known.

    Built by prepare(), which writes nothing; `stream` writes.
    """

    config: HarvestConfig
    models: list[LoadedModel]
    catchers: list[Catcher]
    device: torch.device
    packing: Packing
    batches: Iterator[Batch]
    sources: list[st.Source]
    store_dtype: str
    special_ids: list[int]

    def close(self):
        for catcher in self.catchers:
            catcher.close()

    def keep_mask(self, batch) -> np.ndarray:
        """Rows to store: real tokens (not padding), and not special tokens unless asked."""
        return batch.mask & ~np.isin(batch.ids, self.special_ids)

    @staticmethod
    def row_ids(batch, keep: np.ndarray) -> dict[str, np.ndarray]:
        """The token arrays of the kept rows: token id, corpus window and position in it."""
        window, position = np.nonzero(keep)
        return {"tokens": batch.ids[keep], "sequence": batch.first + window, "position": position}

    def activations(self, batch, keep: np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(batch.ids).to(self.device)
        mask = torch.from_numpy(batch.mask).to(self.device)
        keep_t = torch.from_numpy(keep).to(self.device)
        rows = {}
        for loaded, catcher in zip(self.models, self.catchers):
            for name, acts in catcher(ids, mask).items():
                rows[name] = to_storage(acts[keep_t], self.store_dtype, name, loaded.dtype)
        return rows

    def batch_rows(self, batch) -> tuple[int, Callable]:
        """The batch's row count, and (lo, hi) -> the activations and row arrays of its rows [lo, hi)."""
        keep = self.keep_mask(batch)

        def take(lo: int, hi: int) -> tuple[dict, dict]:
            ids = {k: v[lo:hi] for k, v in self.row_ids(batch, keep).items()}
            return {name: _numpy(rows[lo:hi]) for name, rows in self.activations(batch, keep).items()}, ids

        return int(keep.sum()), take

    def stream(self, writer: st.StoreWriter) -> bool:
        """Harvest into `writer` and close it; True when the corpus ran out before the budget."""
        exhausted = write_batches(writer, self.batches, self.batch_rows, self.config, "tokens")
        writer.close(complete=True, corpus_exhausted=exhausted)
        return exhausted

    def stream_shard(self, writer: st.ChunkWriter, rank: int = 0, world: int = 1) -> int:
        """Harvest this rank's chunks that are not committed yet; return the store's row count.

        The rows and their order are those of `stream`, so the finished store is the same. Block j
        of `block_chunks` chunks belongs to rank j mod world. Every rank reads and tokenizes the
        whole corpus, to know each batch's first row from the token ids alone, and runs the models
        on the batches that hold rows of its chunks (a batch astride two blocks runs on both ranks).
        """
        rows_per_chunk, budget = writer.chunk_rows, self.config.tokens
        per_block = block_chunks(self.config, self.packing.context_length)
        committed = writer.committed()

        def mine(chunk: int) -> bool:
            return (chunk // per_block) % world == rank and chunk not in committed

        parts: dict[int, list] = {}

        def assemble(chunk: int, acts: dict | None, ids: dict | None, last: bool):
            """On the writer thread: collect a chunk's rows, batch by batch; write it when whole."""
            if acts is not None:
                parts.setdefault(chunk, []).append((acts, ids))
            if last:
                pieces = parts.pop(chunk)
                writer.write(chunk, {n: np.concatenate([p[0][n] for p in pieces]) for n in pieces[0][0]},
                             {k: np.concatenate([p[1][k] for p in pieces]) for k in pieces[0][1]})

        background = BackgroundWriter(assemble)
        bar = console.progress(total=budget, unit="tok", unit_scale=True, desc="harvest")
        start = 0  # the store row of the batch's first kept row
        try:
            for batch in self.batches:
                if budget is not None and start >= budget:
                    break
                keep = self.keep_mask(batch)
                n = int(keep.sum())
                stop = start + (n if budget is None else min(n, budget - start))
                chunks = [c for c in range(start // rows_per_chunk, -(-stop // rows_per_chunk)) if mine(c)]
                if chunks:
                    acts = {name: _numpy(rows) for name, rows in self.activations(batch, keep).items()}
                    ids = self.row_ids(batch, keep)
                    for c in chunks:
                        lo, hi = max(start, c * rows_per_chunk), min(stop, (c + 1) * rows_per_chunk)
                        part = slice(lo - start, hi - start)
                        background.put(c, {k: v[part] for k, v in acts.items()},
                                       {k: v[part] for k, v in ids.items()}, hi == (c + 1) * rows_per_chunk)
                bar.update(stop - start)
                start = stop
            last = (start - 1) // rows_per_chunk
            if start % rows_per_chunk and mine(last):  # the store's last chunk is short
                background.put(last, None, None, True)
            background.finish()
        except BaseException:
            background.abort()
            raise
        finally:
            bar.close()
        return start


def block_chunks(config: HarvestConfig, context_length: int) -> int:
    """Chunks per block of work: about BATCHES_PER_BLOCK batches, so that batches run twice are few."""
    rows_per_batch = config.batch_size * context_length  # at most: special tokens are not stored
    return max(1, -(-BATCHES_PER_BLOCK * rows_per_batch // config.chunk_rows))


def prepare(config: HarvestConfig, device: torch.device | None = None) -> Run:
    """Load the models and check everything that can be checked before the store is touched."""
    check_data(config.data)
    device = device or resolve_device(config.device)
    models = [load_model(spec, device, config.dtype) for spec in config.models]
    check_same_vocabulary(models)
    tokenizer = models[0].tokenizer
    packing = Packing.for_tokenizer(tokenizer, resolve_context_length(config, models))
    catchers = []
    try:
        for loaded in models:
            layers = parse_layers(config.layers, n_layers(loaded.model)) if config.layers else []
            sites = resolve_sites(loaded.model, loaded.spec.alias, config.sites, layers)
            catchers.append(Catcher(loaded.model, sites))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        documents = read_documents(config.data, config.text_field, config.split)
        batch_iter = batches(windows(documents, tokenizer, packing), config.batch_size, pad_id)
        first = next(batch_iter, None)
        if first is None:
            raise BadInput(f"--data {config.data!r} holds no text")
        sources = probe_sources(models, catchers, first, device)
        validate_source_names(sources)
    except BaseException:
        for catcher in catchers:
            catcher.close()
        raise
    special = [] if config.keep_special_tokens else sorted(set(tokenizer.all_special_ids))
    return Run(config, models, catchers, device, packing, itertools.chain([first], batch_iter), sources,
               resolve_store_dtype(config, models), special)


# -- models with different tokenizers (--align): rows aligned by character offsets (xcli.data.align) -------

@dataclass
class AlignedBatch:
    """Windows run together: `windows` those with rows (the store's windows `first`, `first` + 1, ...),
    `passed` every window in order, with rows or not (their text is counted)."""

    windows: list[align.Window]
    passed: list[align.Window]
    first: int


def aligned_batches(documents: Iterator[str], tokenizers: list, content_lengths: list[int],
                    special_ids: list[set[int]], batch_size: int) -> Iterator[AlignedBatch]:
    index, sequence, windows, passed = 0, 0, [], []
    for texts in _grouped(documents, TOKENIZE_GROUP):
        per_model = [align.tokenize(tokenizer, texts) for tokenizer in tokenizers]
        for i, text in enumerate(texts):
            for window in align.document_windows(index, text, [tokenized[i] for tokenized in per_model],
                                                 content_lengths, special_ids):
                passed.append(window)
                if window.n_rows:
                    windows.append(window)
                if len(windows) == batch_size:
                    yield AlignedBatch(windows, passed, sequence)
                    sequence += len(windows)
                    windows, passed = [], []
            index += 1
    if passed:
        yield AlignedBatch(windows, passed, sequence)


@dataclass
class AlignedRun:
    """A harvest of models with different tokenizers (--align), ready to stream; built by prepare_aligned.

    Each model runs its own windows (its packing's prefix and suffix around its tokens of the same text);
    a row is a span of text aligned across the models (xcli.data.align), read at each model's last token of
    the span. Resume recounts rows by aligning again, without running the models."""

    config: HarvestConfig
    models: list[LoadedModel]
    catchers: list[Catcher]
    device: torch.device
    packings: list[Packing]
    batches: Iterator[AlignedBatch]
    sources: list[st.Source]
    store_dtype: str
    counts: align.Counts
    closed_characters: int = 0  # of the documents passed
    open_document: tuple[int, int] = (0, 0)  # the current document's length and the end of its last stored row

    close = Run.close

    def inputs(self, m: int, windows: list[align.Window]) -> tuple[torch.Tensor, torch.Tensor]:
        """Model m's padded token ids and attention mask for `windows`."""
        packing = self.packings[m]
        rows = [align.model_window(w, m, packing.prefix, packing.suffix) for w in windows]
        pad = self.models[m].tokenizer.pad_token_id
        ids = np.full((len(rows), max(map(len, rows))), 0 if pad is None else pad, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)], mask[i, :len(row)] = row, True
        return torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    def positions(self, m: int, window: align.Window) -> np.ndarray:
        return align.row_positions(window, m, len(self.packings[m].prefix))

    @staticmethod
    def _cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def row_ids(self, batch: AlignedBatch) -> dict[str, np.ndarray]:
        """Every row array of the batch's rows (xcli.data.store.row_arrays)."""
        ws = batch.windows
        ids = {"sequence": self._cat([np.full(w.n_rows, batch.first + i) for i, w in enumerate(ws)]),
               "document": self._cat([np.full(w.n_rows, w.document) for w in ws]),
               "char_start": self._cat([w.row_starts for w in ws]), "char_end": self._cat([w.row_ends for w in ws])}
        for m, loaded in enumerate(self.models):
            ids[f"aligned/{loaded.spec.alias}/tokens"] = self._cat([w.ids[m][w.row_tokens[m]] for w in ws])
            ids[f"aligned/{loaded.spec.alias}/position"] = self._cat([self.positions(m, w) for w in ws])
        first = self.models[0].spec.alias
        ids["tokens"], ids["position"] = ids[f"aligned/{first}/tokens"], ids[f"aligned/{first}/position"]
        return ids

    def activations(self, batch: AlignedBatch) -> dict[str, torch.Tensor]:
        rows = {}
        for m, (loaded, catcher) in enumerate(zip(self.models, self.catchers)):
            ids, mask = self.inputs(m, batch.windows)
            window = torch.from_numpy(np.concatenate([np.full(w.n_rows, i) for i, w in enumerate(batch.windows)]))
            position = torch.from_numpy(np.concatenate([self.positions(m, w) for w in batch.windows]))
            for name, acts in catcher(ids, mask).items():
                rows[name] = to_storage(acts[window.to(self.device), position.to(self.device)], self.store_dtype,
                                        name, loaded.dtype)
        return rows

    def count(self, batch: AlignedBatch, rows: int) -> None:
        """Count the text of the batch's first `rows` rows, and of the documents up to the last of them."""
        for window in batch.passed:
            if rows == 0 and window.n_rows:  # past the budget; documents without rows before it are read
                return
            if window.first_of_document:
                self.closed_characters += self.open_document[0]
                self.open_document = (window.text_length, 0)
            take = min(rows, window.n_rows)
            spans = window.row_ends[:take] - window.row_starts[:take]
            self.counts.aligned += int(spans.sum())
            self.counts.one_to_one += int(spans[window.one_to_one[:take]].sum())
            if take:
                self.open_document = (window.text_length, int(window.row_ends[take - 1]))
            if take < window.n_rows:  # the budget ends inside this window
                return
            rows -= take

    def count_characters(self, exhausted: bool) -> None:
        """Every document read counts whole, but the last one at a budget: up to its last stored row."""
        length, last_end = self.open_document
        self.counts.characters = self.closed_characters + (length if exhausted else last_end)

    def batch_rows(self, batch: AlignedBatch) -> tuple[int, Callable]:
        """The batch's row count, and (lo, hi) -> the activations and row arrays of its rows [lo, hi)."""
        def take(lo: int, hi: int) -> tuple[dict, dict]:
            ids = {k: v[lo:hi] for k, v in self.row_ids(batch).items()}
            return {name: _numpy(rows[lo:hi]) for name, rows in self.activations(batch).items()}, ids

        return sum(w.n_rows for w in batch.windows), take

    def stream(self, writer: st.StoreWriter) -> bool:
        """Harvest into `writer` and close it; True when the corpus ran out before the budget."""
        exhausted = write_batches(writer, self.batches, self.batch_rows, self.config, "aligned rows", self.count)
        self.count_characters(exhausted)
        alignment = {**writer.meta["alignment"], **self.counts.to_json()}
        report = (f"aligned {alignment['aligned_fraction']:.2%} of the text read ({self.counts.aligned} of "
                  f"{self.counts.characters} characters; {alignment['one_to_one_fraction']:.2%} one token in every "
                  f"model)")
        if alignment["aligned_fraction"] < LOW_ALIGNMENT:
            console.warn(f"{report}: spans longer than a window have no row; a larger --context-length keeps more")
        else:
            console.info(report)
        writer.close(complete=True, corpus_exhausted=exhausted, alignment=alignment)
        return exhausted


def prepare_aligned(config: HarvestConfig, device: torch.device | None = None) -> AlignedRun:
    """Load the models, each with its own tokenizer and packing, and check what can be checked before
    the store is touched (as prepare)."""
    check_data(config.data)
    device = device or resolve_device(config.device)
    models = [load_model(spec, device, config.dtype) for spec in config.models]
    for loaded in models:
        align.check_fast(loaded.tokenizer, loaded.spec.alias)
        if not is_plain_name(loaded.spec.alias):
            raise BadInput(f"model alias {loaded.spec.alias!r} is not a plain name (letters, digits, _ . -); "
                           f"name the model with ALIAS=ID_OR_PATH")
    context_length = resolve_context_length(config, models)
    packings = [Packing.for_tokenizer(loaded.tokenizer, context_length) for loaded in models]
    catchers = []
    try:
        for loaded in models:
            layers = parse_layers(config.layers, n_layers(loaded.model)) if config.layers else []
            sites = resolve_sites(loaded.model, loaded.spec.alias, config.sites, layers)
            catchers.append(Catcher(loaded.model, sites))
        documents = read_documents(config.data, config.text_field, config.split)
        special = [set(loaded.tokenizer.all_special_ids) for loaded in models]
        batch_iter = aligned_batches(documents, [m.tokenizer for m in models],
                                     [p.content_length for p in packings], special, config.batch_size)
        first = next((b for b in batch_iter if b.windows), None)
        if first is None:
            raise BadInput(f"--data {config.data!r} holds no text that the models' tokenizations align on")
        run = AlignedRun(config, models, catchers, device, packings, itertools.chain([first], batch_iter), [],
                         resolve_store_dtype(config, models), align.Counts())
        run.sources = probe_aligned_sources(run, first.windows[0])
        validate_source_names(run.sources)
    except BaseException:
        for catcher in catchers:
            catcher.close()
        raise
    return run


def probe_aligned_sources(run: AlignedRun, window: align.Window) -> list[st.Source]:
    """Each model's sites and widths, from a few of its own tokens of the first window."""
    sources = []
    for m, (loaded, catcher) in enumerate(zip(run.models, run.catchers)):
        ids, mask = run.inputs(m, [window])
        length = min(PROBE_TOKENS, int(mask[0].sum()))
        widths = {name: int(t.shape[-1]) for name, t in catcher(ids[:, :length], mask[:, :length]).items()}
        for site in catcher.sites:
            sources.append(st.Source(name=site.name, model=loaded.spec.alias, site=site.site, layer=site.layer,
                                     d=widths[site.name], revision=loaded.revision))
    return sources


def check_resumable(run: Run) -> None:
    if st.open_store(run.config.output).sources != run.sources:
        raise BadInput(f"store {str(run.config.output)!r} holds other sources than these models give; "
                       f"pass --overwrite to start again")


def store_meta(run: Run | AlignedRun) -> dict:
    config = run.config
    if isinstance(run, AlignedRun):
        return {"tokenizer": config.identity()["models"][0]["id"], "context_length": run.packings[0].context_length,
                "dataset": describe_data(config.data), "packing": run.packings[0].to_json(),
                "special_tokens_stored": False, "harvest": config.identity(),
                "alignment": {"models": [m.spec.alias for m in run.models], "method": "common character boundaries",
                              "tokenizers": [m["id"] for m in config.identity()["models"]],
                              "packings": {m.spec.alias: p.to_json() for m, p in zip(run.models, run.packings)}}}
    return {"tokenizer": config.identity()["models"][0]["id"], "context_length": run.packing.context_length,
            "dataset": describe_data(config.data), "packing": run.packing.to_json(),
            "special_tokens_stored": config.keep_special_tokens, "harvest": config.identity()}


def open_writer(run: Run, state: str) -> st.StoreWriter:
    config = run.config
    if state == "resume":
        check_resumable(run)
        return st.StoreWriter(config.output, run.sources, resume=True)
    if config.output.exists():
        files.remove(config.output)  # --overwrite, now that the inputs are known to be good
    return st.StoreWriter(config.output, run.sources, store_meta(run), dtype=run.store_dtype,
                          chunk_rows=config.chunk_rows, codec=config.codec)


def harvest(config: HarvestConfig) -> Path | None:
    """Write the store at config.output and return its path (None on the other ranks under torchrun).

    Under torchrun every rank calls this and harvests its share (see harvest_sharded). A store
    that ranks left incomplete is continued by harvest_sharded too, with any number of ranks.
    """
    if launched() and config.align:
        raise BadInput("--align runs in one process, not under torchrun")
    if launched():
        device = local_device(resolve_device(config.device))
        with process_group(device) as comm, ExitStack() as held:
            quiet = console.settings.quiet
            console.settings.quiet = quiet or not comm.main  # one rank speaks
            try:  # rank 0 holds the output's lock for the job; if it cannot, every rank stops
                together(comm, (lambda: held.enter_context(files.output_lock(config.output))) if comm.main
                         else None, catching=BadInput)
                return harvest_sharded(config, comm, device)
            finally:
                console.settings.quiet = quiet
    with files.output_lock(config.output):
        return harvest_alone(config)


def harvest_alone(config: HarvestConfig) -> Path:
    """One process: a new store, a resumed one, or nothing to do."""
    if config.resume and st.is_sharded(config.output):
        return harvest_sharded(config, SINGLE)
    state = existing_store_state(config)
    if state == "done":
        console.info(f"{config.output} is complete and was written with the same arguments: nothing to do")
        st.remove_progress(config.output)
        return config.output
    run = prepare_aligned(config) if config.align else prepare(config)
    try:
        writer = open_writer(run, state)
        try:
            exhausted = run.stream(writer)
        except BadInput:
            if state == "new":  # e.g. a bad record deep in the corpus: leave nothing behind
                files.remove(config.output)
            raise
        except OSError as e:  # a full disk: the finished chunks are kept, as after a kill
            refused = files.machine_refusal(e)
            if refused is None:
                raise
            raise XcError(f"{refused} while writing {str(config.output)!r}; its finished chunks are kept: "
                          f"free some space and continue with the same command and --resume") from e
    finally:
        run.close()
    if exhausted and config.tokens is not None:
        console.warn(f"the corpus holds only {writer.n_tokens} tokens to store, fewer than --tokens "
                     f"{config.tokens}; stored them all")
    return config.output


def open_sharded(run: Run, state: str) -> None:
    """Rank 0: a new store for the ranks, or an incomplete one made ready for them."""
    config = run.config
    if state == "resume":
        st.make_sharded(config.output)
        return
    if config.output.exists():
        files.remove(config.output)  # --overwrite, now that the inputs are known to be good
    st.create_sharded(config.output, run.sources, store_meta(run), dtype=run.store_dtype,
                      chunk_rows=config.chunk_rows, codec=config.codec)


def harvest_sharded(config: HarvestConfig, comm: Comm, device: torch.device | None = None) -> Path | None:
    """Every rank harvests its chunks of one store (xcli.data.store.ChunkWriter); rank 0 creates and finishes it.

    The store equals the one a single process writes. The ranks check the arguments and load the
    models before anything is written, and stop together, with one message, if any of them fails.
    """
    def check_and_load():
        state = existing_store_state(config)
        if state == "done":
            return state, None
        if config.data == "-" and comm.world > 1:
            raise BadInput("--data - (stdin) cannot be read by several ranks; save the corpus to a file")
        run = prepare(config, device)
        if state == "resume":
            try:
                check_resumable(run)
            except BadInput:
                run.close()
                raise
        return state, run

    state, run = together(comm, check_and_load)
    if state == "done":
        console.info(f"{config.output} is complete and was written with the same arguments: nothing to do")
        if comm.main:
            st.remove_progress(config.output)
        return config.output if comm.main else None
    try:
        together(comm, (lambda: open_sharded(run, state)) if comm.main else None)
        try:  # a bad record deep in the corpus is met by every rank; other errors stop the job at once
            n_tokens = together(comm, lambda: run.stream_shard(st.ChunkWriter(config.output), comm.rank,
                                                               comm.world), catching=BadInput)
        except BadInput:
            if state == "new" and comm.main:  # leave nothing behind
                files.remove(config.output)
            raise
        exhausted = config.tokens is None or n_tokens < config.tokens
        finish = lambda: st.finish_sharded(config.output, n_tokens, corpus_exhausted=exhausted)  # noqa: E731
        together(comm, finish if comm.main else None)  # the other ranks return once the store is finished
    finally:
        run.close()
    if exhausted and config.tokens is not None:
        console.warn(f"the corpus holds only {n_tokens} tokens to store, fewer than --tokens "
                     f"{config.tokens}; stored them all")
    return config.output if comm.main else None
