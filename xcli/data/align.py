"""Aligning the token streams of models with different tokenizers, by character offsets (xc harvest --align).

Each model tokenizes a document on its own (fast tokenizers report each token's characters). A
character c is a *boundary* of a model's tokenization when some token ends at c and no later
token starts before c: the text up to c is exactly that model's tokens up to there. The aligned
rows of a document are its boundaries common to every model; a row stands for the span from the
previous common boundary (or the document's start) to c, and keeps each model's last token of
that span, the one that has read the whole span. This is the DFC paper's greedy window expansion
(grow whichever side ends earlier until both end at one character, keep the last tokens) said as
a set intersection, so text that no window can cover is never guessed at.

A byte-level BPE splits a character of several UTF-8 bytes into tokens that share its offsets;
only the last of them ends a boundary, as the rule above says. Offsets count Python characters
(code points), which is what `char_start` and `char_end` in a store count too.

Windows hold one document, or a part of one cut at a common boundary so that every model's
tokens fit its window; the tokens after a document's last common boundary are never run.
"""

from dataclasses import dataclass, field

import numpy as np

from xcli.errors import BadInput


def check_fast(tokenizer, alias: str) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise BadInput(f"model {alias!r} has a slow (Python) tokenizer, which reports no character offsets; "
                       f"--align needs a fast one (a tokenizer.json in its folder)")


def tokenize(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text: its token ids (n,) and character offsets (n, 2), without special tokens."""
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, dtype=np.int64).reshape(-1), np.asarray(offsets, dtype=np.int64).reshape(-1, 2))
            for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"])]


def boundaries(offsets: np.ndarray) -> dict[int, int]:
    """{character c: index of the last token ending at c} for every boundary c > 0 of one tokenization."""
    if len(offsets) == 0:
        return {}
    reach = np.maximum.accumulate(offsets[:, 1])  # the furthest character read so far
    later_start = np.minimum.accumulate(offsets[::-1, 0])[::-1]  # the earliest start from each token on
    clean = np.append(later_start[1:] >= reach[:-1], True)  # nothing after token i reaches back before it
    last_of_reach = np.append(reach[1:] != reach[:-1], True)  # the last token with this reach
    ends = np.nonzero(clean & last_of_reach & (reach > 0))[0]
    return {int(reach[i]): int(i) for i in ends}


def common_boundaries(offsets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The characters where every tokenization has a boundary, ascending (k,), and per model the index of
    its token ending there (models, k)."""
    per_model = [boundaries(o) for o in offsets]
    common = sorted(set.intersection(*(set(b) for b in per_model)))
    ends = np.asarray(common, dtype=np.int64)
    tokens = np.asarray([[b[c] for c in common] for b in per_model], dtype=np.int64).reshape(len(offsets), len(common))
    return ends, tokens


@dataclass
class Window:
    """A piece of one document that every model runs on: model m's tokens [first[m], last[m]] of the
    document, and its rows: their spans (characters) and per model the token index of each (into the
    document). A document with no row gets one window with no rows, so that its text is counted."""

    document: int
    text_length: int
    first_of_document: bool
    first: list[int]
    last: list[int]
    row_starts: np.ndarray
    row_ends: np.ndarray
    row_tokens: np.ndarray  # (models, rows)
    one_to_one: np.ndarray  # per row: the span is one token in every model
    ids: list[np.ndarray] = field(default_factory=list)  # per model: the document's token ids

    @property
    def n_rows(self) -> int:
        return len(self.row_ends)


@dataclass
class Counts:
    """Characters of the documents read, and of the stored rows' spans: the fractions xc harvest reports."""

    characters: int = 0
    aligned: int = 0
    one_to_one: int = 0  # in spans that are one token in every model

    def to_json(self) -> dict:
        return {"characters": self.characters, "aligned_characters": self.aligned,
                "one_to_one_characters": self.one_to_one,
                "aligned_fraction": self.aligned / self.characters if self.characters else 0.0,
                "one_to_one_fraction": self.one_to_one / self.characters if self.characters else 0.0}


def document_windows(index: int, text: str, tokenized: list[tuple[np.ndarray, np.ndarray]],
                     content_lengths: list[int], special_ids: list[set[int]]) -> list[Window]:
    """The windows of one document, cut at common boundaries so that model m's part fits content_lengths[m].

    A span longer than some model's window on its own, or ending in a special token of some model (text
    that spells one), has no row: its text counts as not aligned."""
    ends, tokens = common_boundaries([offsets for _, offsets in tokenized])
    ids = [i for i, _ in tokenized]
    models = len(tokenized)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    # Model m's tokens of each span: (the previous common boundary's token, this one's].
    span_first = np.concatenate([np.zeros((models, 1), dtype=np.int64), tokens[:, :-1] + 1], axis=1)
    span_size = tokens - span_first + 1
    limits = np.asarray(content_lengths)[:, None]
    special = np.zeros(len(ends), dtype=bool)
    for m in range(models):
        special |= np.isin(ids[m][tokens[m]], sorted(special_ids[m]))
    fits = (span_size <= limits).all(axis=0) & ~special
    one_token = (span_size == 1).all(axis=0)
    windows, row = [], 0
    while row < len(ends):
        if not fits[row]:
            row += 1
            continue
        first = span_first[:, row]
        stop = row + 1
        while stop < len(ends) and (tokens[:, stop] - first + 1 <= limits[:, 0]).all():
            stop += 1
        keep = np.nonzero(fits[row:stop])[0] + row
        windows.append(Window(index, len(text), not windows, [int(f) for f in first],
                              [int(t) for t in tokens[:, stop - 1]], starts[keep], ends[keep], tokens[:, keep],
                              one_token[keep], ids))
        row = stop
    if not windows:
        empty = np.zeros(0, dtype=np.int64)
        windows.append(Window(index, len(text), True, [0] * models, [-1] * models, empty, empty,
                              np.zeros((models, 0), dtype=np.int64), np.zeros(0, dtype=bool), ids))
    return windows


def model_window(window: Window, m: int, prefix, suffix) -> list[int]:
    """Model m's token ids of `window` as it runs them: its packing's prefix, its tokens of the text, its suffix."""
    return [*prefix, *window.ids[m][window.first[m]:window.last[m] + 1].tolist(), *suffix]


def row_positions(window: Window, m: int, prefix_length: int) -> np.ndarray:
    """The positions of the window's rows in model m's window (model_window)."""
    return prefix_length + window.row_tokens[m] - window.first[m]
