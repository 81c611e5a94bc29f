"""Spliced-in next-token loss on an aligned store (xc harvest --align): each model with its own tokens.

The models of an aligned store have different tokenizers, so each runs its own tokenization of
the same windows of text (xcli.data.align), framed by its own packing. A window's rows are the
spans of text that every tokenization ends at the same character; row r is read in model m at
position positions[m][r], m's last token of the span. For each batch of windows:

1. every model runs clean; hooks record its sources' activations at its positions of the rows,
   and a causal LM keeps its next-token log-probabilities;
2. the crosscoder encodes the activations of all models at each row together and decodes them;
3. each causal LM with written sources runs twice more, with those sources replaced at its own
   positions of the rows by the reconstruction (spliced) or by zeros (ablated). Its other positions
   (tokens inside a span of several tokens, the packing's prefix and suffix) stay clean.

A model's prediction of its next token is scored at its position of a row when the row is
evaluated and the position has a next token in the model's window; CE and KL are as in
xcli.analysis.splice. Per model also: `positions` (its own tokens of the measured text, without
prefix and suffix), `spliced` (its positions at rows) and `spliced_fraction` = spliced / positions.
A model without a causal LM head (an encoder such as BERT) runs only to give the crosscoder its
activations; no loss is measured for it.

Windows: by default the store's own. The harvest recorded its corpus; its documents are read again
and aligned again with the tokenizer of every model of the store, and each rebuilt window must give
the stored rows (spans, token ids and positions of every model) or the measurement stops. Every row
of a rebuilt window is spliced; the store's rows in the evaluated chunks are scored. With --data, each
non-empty line of the text file is a document, aligned and cut into windows in the same way (the
store's packings and context length), and every row is spliced and scored.
"""

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from xcli import console
from xcli.analysis.splice import (
    SiteHooks,
    SpliceConfig,
    add_scores,
    data_lines,
    model_specs,
    new_sums,
    scores,
    spread_rows,
    window_rows,
)
from xcli.data import align
from xcli.data.config import data_content
from xcli.data.corpus import read_documents
from xcli.data.loader import StoreSet
from xcli.errors import BadInput
from xcli.lm.config import ModelSpec
from xcli.lm.models import fast_dtype, load_lm_or_encoder, load_tokenizer


@dataclass
class TextWindow:
    """One window of text as every model of the store runs it."""

    ids: list[np.ndarray]
    """Per model of the store: its token ids, prefix and suffix included."""
    positions: list[np.ndarray]
    """Per model: (rows,) its position of each row, ascending."""
    score: np.ndarray
    """(rows,) the rows whose predictions are scored."""
    content: list[int]
    """Per model: its tokens of the text (no prefix or suffix)."""


@dataclass
class Framing:
    """What the harvest framed each model's windows with, as the store records it."""

    aliases: list[str]
    prefixes: list[list[int]]
    suffixes: list[list[int]]
    content_lengths: list[int]
    special_ids: list[set[int]]
    tokenizers: list

    def window(self, window: align.Window, score: np.ndarray) -> TextWindow:
        ids = [np.asarray(align.model_window(window, m, self.prefixes[m], self.suffixes[m]), dtype=np.int64)
               for m in range(len(self.aliases))]
        positions = [align.row_positions(window, m, len(self.prefixes[m])) for m in range(len(self.aliases))]
        content = [window.last[m] - window.first[m] + 1 for m in range(len(self.aliases))]
        return TextWindow(ids, positions, score, content)

    def document_windows(self, index: int, text: str) -> list[align.Window]:
        tokenized = [align.tokenize(tokenizer, [text])[0] for tokenizer in self.tokenizers]
        return align.document_windows(index, text, tokenized, self.content_lengths, self.special_ids)


def int_list(value, what: str, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise BadInput(f"store {where!r}: {what} is {value!r}, not a list of token ids")
    return value


def framing(store, specs: dict[str, ModelSpec]) -> Framing:
    """The store's models in its order, each with its packing and tokenizer (the given model's, or the one
    the harvest recorded)."""
    where, alignment = str(store.path), store.alignment
    recorded = {m.get("alias"): m for m in (store.meta.get("harvest") or {}).get("models", [])
                if isinstance(m, dict)}
    packings = alignment.get("packings")
    aliases = list(alignment["models"])
    if not isinstance(packings, dict) or sorted(packings) != sorted(aliases):
        raise BadInput(f"store {where!r}: alignment.packings must give the packing of each of "
                       f"{', '.join(aliases)}")
    frame = Framing(aliases, [], [], [], [], [])
    for alias in aliases:
        packing = packings[alias]
        prefix = int_list(packing.get("prefix") if isinstance(packing, dict) else None, f"the prefix of {alias}",
                          where)
        suffix = int_list(packing.get("suffix"), f"the suffix of {alias}", where)
        length = packing.get("context_length")
        if not isinstance(length, int) or isinstance(length, bool) or length <= len(prefix) + len(suffix):
            raise BadInput(f"store {where!r}: the context length of {alias} is {length!r}, which leaves no room "
                           f"for text after its prefix and suffix")
        if alias in specs:
            spec = specs[alias]
        elif isinstance(recorded.get(alias, {}).get("id"), str):
            spec = ModelSpec(alias, recorded[alias]["id"], recorded[alias].get("revision"))
        else:
            raise BadInput(f"store {where!r} aligns model {alias!r} but records no path for it; pass "
                           f"--model {alias}=PATH")
        tokenizer = load_tokenizer(spec)
        align.check_fast(tokenizer, alias)
        frame.prefixes.append(prefix)
        frame.suffixes.append(suffix)
        frame.content_lengths.append(length - len(prefix) - len(suffix))
        frame.special_ids.append(set(tokenizer.all_special_ids))
        frame.tokenizers.append(tokenizer)
    return frame


# -- windows ---------------------------------------------------------------------------------------------

def text_windows(path: str, frame: Framing, limit: int) -> list[TextWindow]:
    """The first `limit` windows with rows of a text file, one document per non-empty line; every row scored."""
    lines = data_lines(path)
    windows = []
    for index, line in enumerate(lines):
        for window in frame.document_windows(index, line):
            if window.n_rows and len(windows) < limit:
                windows.append(frame.window(window, np.ones(window.n_rows, dtype=bool)))
        if len(windows) == limit:
            break
    return windows


def store_documents(store, wanted: set[int]) -> dict[int, str]:
    """The documents of the store's corpus with these indexes, read again from the corpus the harvest
    recorded (which must hold the same text)."""
    harvest = store.meta.get("harvest") or {}
    data = harvest.get("data")
    if not isinstance(data, str) or data == "-":
        source = "stdin" if data == "-" else "no recorded corpus"
        raise BadInput(f"store {str(store.path)!r} was harvested from {source}, which cannot be read again; "
                       f"pass --data TEXT_FILE")
    recorded = harvest.get("data_content")
    if Path(data).is_absolute() and not Path(data).exists():
        raise BadInput(f"the corpus {data!r} that store {str(store.path)!r} was harvested from is not there; "
                       f"pass --data TEXT_FILE")
    if recorded is not None and data_content(data) != recorded:
        raise BadInput(f"the corpus {data!r} changed since store {str(store.path)!r} was harvested from it; "
                       f"pass --data TEXT_FILE")
    found, last = {}, max(wanted)
    for index, text in enumerate(read_documents(data, harvest.get("text_field") or "text",
                                                harvest.get("split") or "train")):
        if index in wanted:
            found[index] = text
        if index >= last:
            break
    if len(found) < len(wanted):
        raise BadInput(f"the corpus {data!r} holds fewer documents than store {str(store.path)!r} refers to; "
                       f"pass --data TEXT_FILE")
    return found


def store_windows(stores: StoreSet, store, chunks, limit: int, frame: Framing) -> list[TextWindow]:
    """Up to `limit` of the store's windows holding evaluated rows, spread over them, rebuilt from the corpus."""
    group, n = store.group, stores.n_tokens
    evaluated = {int(c) for c in chunks}
    picked = []  # (rows lo, hi) of each window
    for row in spread_rows(stores, chunks, limit):
        seq = int(group["sequence"][row])
        if not picked or picked[-1][0] != seq:
            lo, hi = window_rows(group["sequence"], row, seq, n)
            picked.append((seq, lo, hi))
    arrays = ["document", "char_start", "char_end",
              *(f"aligned/{a}/{k}" for a in frame.aliases for k in ("tokens", "position"))]
    rows = [{name: np.asarray(group[name][lo:hi], dtype=np.int64) for name in arrays} for _, lo, hi in picked]
    for (seq, lo, hi), stored in zip(picked, rows):
        if len(set(stored["document"].tolist())) != 1:
            raise BadInput(f"store {str(store.path)!r}: the rows {lo}-{hi - 1} of window {seq} belong to several "
                           f"documents; the store is damaged")
    texts = store_documents(store, {int(r["document"][0]) for r in rows})
    windows = []
    for (seq, lo, hi), stored in zip(picked, rows):
        document = int(stored["document"][0])
        own = next((w for w in frame.document_windows(document, texts[document])
                    if w.n_rows and w.row_ends[0] == stored["char_end"][0]), None)
        count = hi - lo
        same = own is not None and own.n_rows >= count and \
            np.array_equal(own.row_starts[:count], stored["char_start"]) and \
            np.array_equal(own.row_ends[:count], stored["char_end"])
        for m, alias in enumerate(frame.aliases):
            if not same:
                break
            same = np.array_equal(own.ids[m][own.row_tokens[m][:count]], stored[f"aligned/{alias}/tokens"]) and \
                np.array_equal(align.row_positions(own, m, len(frame.prefixes[m]))[:count],
                               stored[f"aligned/{alias}/position"])
        if not same:
            raise BadInput(f"window {seq} of store {str(store.path)!r} (rows {lo}-{hi - 1}, document {document}) "
                           f"is not what aligning its corpus again gives (other tokenizers, or a damaged store); "
                           f"pass --data TEXT_FILE")
        score = np.zeros(own.n_rows, dtype=bool)  # every row of the window is spliced; stored, evaluated ones scored
        score[:count] = np.isin(np.arange(lo, hi) // stores.chunk_rows, list(evaluated))
        windows.append(frame.window(own, score))
    return windows


# -- the measurement -------------------------------------------------------------------------------------

@dataclass
class ModelRun:
    alias: str
    path: str
    index: int  # in the store's models
    hooks: SiteHooks
    written: list[str]
    causal: bool
    pad: int


def padded(windows: list[TextWindow], m: int, pad: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Model m's ids and attention mask (B, T), its row positions as a mask, and its scored positions."""
    T = max(len(w.ids[m]) for w in windows)
    ids = np.full((len(windows), T), pad, dtype=np.int64)
    attention, rows, score = (np.zeros((len(windows), T), dtype=bool) for _ in range(3))
    for b, w in enumerate(windows):
        length = len(w.ids[m])
        ids[b, :length], attention[b, :length] = w.ids[m], True
        rows[b, w.positions[m]] = True
        scored = w.positions[m][w.score]
        score[b, scored[scored < length - 1]] = True  # a prediction needs a next token in the window
    return tuple(torch.from_numpy(a).to(device) for a in (ids, attention.astype(np.int64), rows, score))


def measure_batch(crosscoder, runs: list[ModelRun], batch: list[TextWindow], device, sums: dict) -> None:
    inputs = {run.alias: padded(batch, run.index, run.pad, device) for run in runs}
    clean, captured = {}, {}
    for run in runs:
        ids, attention, rows, _ = inputs[run.alias]
        clean[run.alias] = run.hooks.run(ids, attention)
        # Positions ascend within a window, so the mask's order is every model's row order.
        captured.update({name: value[rows].float() for name, value in run.hooks.captured.items()})
    x = {name: captured[name].to(crosscoder.b_enc.device) for name in crosscoder.read}
    recon = {name: value.to(device) for name, value in crosscoder.decode(crosscoder.encode(x)).items()}
    for run in runs:
        if not (run.written and run.causal):
            continue
        ids, attention, rows, score = inputs[run.alias]
        spliced = run.hooks.run(ids, attention, {n: recon[n] for n in run.written}, rows)
        ablated = run.hooks.run(ids, attention, {n: torch.zeros_like(recon[n]) for n in run.written}, rows)
        add_scores(sums[run.alias], ids, score, clean[run.alias], spliced, ablated)


def aligned_spliced_loss(crosscoder, stores: StoreSet, chunks, cfg: SpliceConfig) -> dict:
    """Per model with written sources: the positions spliced and, for a causal LM, the loss (as
    xcli.analysis.splice.spliced_loss gives it, with ce_increase)."""
    store = next(s for s in stores.stores if s.alignment)
    device = torch.device(cfg.device)
    dtype = fast_dtype(cfg.dtype, device)
    specs = model_specs(crosscoder, stores, cfg.models)
    frame = framing(store, {spec.alias: spec for spec, _ in specs})
    unknown = [spec.alias for spec, _ in specs if spec.alias not in frame.aliases]
    if unknown:
        raise BadInput(f"model {unknown[0]!r} is not one of the models store {str(store.path)!r} aligns "
                       f"({', '.join(frame.aliases)}); name each model by its alias in the store")
    if cfg.data is not None:
        windows = text_windows(cfg.data, frame, cfg.windows)
    else:
        windows = store_windows(stores, store, chunks, cfg.windows, frame)
    if not windows:
        raise BadInput("no window with an aligned row to splice")
    runs = []
    for spec, sources in specs:
        model, causal = load_lm_or_encoder(spec, device, dtype)
        m = frame.aliases.index(spec.alias)
        pad = frame.tokenizers[m].pad_token_id
        runs.append(ModelRun(spec.alias, spec.id, m, SiteHooks(model, sources),
                             [s.name for s in sources if s.name in crosscoder.write], causal,
                             0 if pad is None else pad))
    if not any(run.causal and run.written for run in runs):
        raise BadInput("no model the crosscoder writes to has a causal language-model head, so there is no "
                       "next-token loss to measure (encoders are only read)")
    sums = {run.alias: new_sums() for run in runs}
    with torch.inference_mode(), ExitStack() as stack:
        for run in runs:
            stack.enter_context(run.hooks)
        bar = stack.enter_context(console.progress(total=len(windows), desc="splice", unit="window"))
        for start in range(0, len(windows), cfg.window_batch):
            batch = windows[start:start + cfg.window_batch]
            measure_batch(crosscoder, runs, batch, device, sums)
            bar.update(len(batch))
    out = {}
    for run in runs:
        if not run.written:
            continue
        entry = {"path": run.path, "sources": run.written, "windows": len(windows)}
        if not run.causal:
            entry["note"] = "no causal language-model head: its activations are read, no loss is measured"
        elif sums[run.alias]["tokens"] == 0:
            raise BadInput(f"no position of model {run.alias!r} to score: no spliced position of an evaluated "
                           f"row has a next token in its window")
        else:
            positions = sum(w.content[run.index] for w in windows)
            spliced = sum(len(w.positions[run.index]) for w in windows)
            entry.update({"positions": positions, "spliced": spliced, "spliced_fraction": spliced / positions,
                          **scores(sums[run.alias])})
        out[run.alias] = entry
    return out
