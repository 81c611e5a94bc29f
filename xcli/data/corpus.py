"""From a text corpus to fixed-length windows of token ids, streamed.

Documents (one per line of a text file; one per record of a .jsonl file; one per
.txt file of a folder; one per row of a Hugging Face dataset) are tokenized
without special tokens and joined into one stream, with the tokenizer's EOS (or
SEP) token between documents. The stream is cut into windows:

    window = PREFIX + next (context_length - len(PREFIX) - len(SUFFIX)) stream ids + SUFFIX

PREFIX and SUFFIX are what the tokenizer itself adds around a text (e.g. BOS for
Llama, CLS/SEP for BERT); a tokenizer that adds nothing but has a BOS token (GPT-2)
gets that BOS as PREFIX, so position 0 of every window, the attention sink, is a
special token. A document longer than a window continues in the next window;
shorter documents are packed together; nothing is padded except the last window
of the corpus, which may be shorter. Nothing here holds more than a few documents.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from xcli.errors import BadInput
from xcli.files import read_utf8, utf8_stdin

TOKENIZE_GROUP = 64  # documents tokenized per call: fast tokenizers batch well


def check_data(data: str) -> None:
    """Fail early on a --data argument that cannot be read."""
    if data == "-":
        return
    path = Path(data).expanduser()
    if path.is_dir():
        if not any(path.rglob("*.txt")):
            raise BadInput(f"--data folder {data!r} holds no .txt files")
        return
    if path.exists():
        return
    if data.startswith((".", "/", "~")) or data.endswith((".txt", ".jsonl", ".json")):
        raise BadInput(f"--data file {data!r} does not exist")
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise BadInput(f"--data {data!r} is not a file or folder, and Hugging Face dataset names need the "
                       f"'datasets' package (pip install 'xcli[data]')") from None


def _lines(path: Path, stream=None) -> Iterator[tuple[int, str]]:
    handle = stream if stream is not None else open(path, encoding="utf-8")
    try:
        for number, line in enumerate(handle, 1):
            yield number, line.rstrip("\n")
    except UnicodeDecodeError:
        raise BadInput(f"--data {str(path)!r} is not UTF-8 text") from None
    finally:
        if stream is None:
            handle.close()


def _jsonl(path: Path, field: str) -> Iterator[str]:
    for number, line in _lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"line {number} of {str(path)!r} is not JSON") from None
        if not isinstance(record, dict) or field not in record:
            fields = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise BadInput(f"line {number} of {str(path)!r} has no field {field!r} (it has: {fields}); "
                           f"choose one with --text-field")
        if not isinstance(record[field], str):
            raise BadInput(f"field {field!r} on line {number} of {str(path)!r} is not a string")
        yield record[field]


def _dataset(name: str, field: str, split: str) -> Iterator[str]:
    import os

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read from the local cache only
    import datasets

    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as e:
        raise BadInput(f"dataset {name!r} (split {split!r}) was not found locally; xc uses no network: "
                       f"download it first ({type(e).__name__})") from None
    for row in rows:
        if field not in row:
            raise BadInput(f"dataset {name!r} has no field {field!r} (it has: {', '.join(sorted(row))}); "
                           f"choose one with --text-field")
        yield row[field]


def read_documents(data: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Non-empty documents of --data, lazily, in a fixed order."""
    path = Path(data).expanduser()
    if data == "-":
        texts = (line for _, line in _lines(Path("<stdin>"), utf8_stdin()))
    elif path.is_dir():
        texts = (read_utf8(p, "--data file") for p in sorted(path.rglob("*.txt")))
    elif path.suffix == ".jsonl":
        texts = _jsonl(path, text_field)
    elif path.exists():
        texts = (line for _, line in _lines(path))
    else:
        texts = _dataset(data, text_field, split)
    return (text for text in texts if text.strip())


@dataclass(frozen=True)
class Packing:
    """How windows are framed: special ids before and after the content, and between documents."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: tuple[int, ...]
    context_length: int

    @property
    def content_length(self) -> int:
        return self.context_length - len(self.prefix) - len(self.suffix)

    @classmethod
    def for_tokenizer(cls, tokenizer, context_length: int) -> "Packing":
        # What the tokenizer adds around a text: compare with and without special tokens.
        text = "the"
        bare = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = tokenizer(text, add_special_tokens=True)["input_ids"]
        prefix, suffix = [], []
        for start in range(len(full) - len(bare) + 1):
            if bare and full[start:start + len(bare)] == bare:
                prefix, suffix = full[:start], full[start + len(bare):]
                break
        if not prefix and tokenizer.bos_token_id is not None:
            prefix = [tokenizer.bos_token_id]
        sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        packing = cls(tuple(prefix), tuple(suffix), () if sep is None else (sep,), context_length)
        if packing.content_length < 1:
            raise BadInput(f"--context-length {context_length} leaves no room for text after the "
                           f"{len(prefix) + len(suffix)} special tokens the tokenizer adds")
        return packing

    def to_json(self) -> dict:
        return {"prefix": list(self.prefix), "suffix": list(self.suffix), "separator": list(self.separator),
                "context_length": self.context_length}


def token_stream(documents: Iterator[str], tokenizer, separator: tuple[int, ...]) -> Iterator[list[int]]:
    """The ids of all documents with the separator between them, a group of documents at a time."""
    first = True
    for texts in _grouped(documents, TOKENIZE_GROUP):
        ids = []
        for doc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            if not first:
                ids.extend(separator)
            ids.extend(doc)
            first = False
        yield ids


def _grouped(items: Iterator, size: int) -> Iterator[list]:
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def windows(documents: Iterator[str], tokenizer, packing: Packing) -> Iterator[list[int]]:
    """Token-id windows of packing.context_length (the last one may be shorter)."""
    size, buffer = packing.content_length, []
    for ids in token_stream(documents, tokenizer, packing.separator):
        buffer.extend(ids)
        whole = len(buffer) // size * size
        for start in range(0, whole, size):
            yield [*packing.prefix, *buffer[start:start + size], *packing.suffix]
        del buffer[:whole]
    if buffer:
        yield [*packing.prefix, *buffer, *packing.suffix]


@dataclass
class Batch:
    """Windows padded to one length: ids and mask are (windows, tokens); `first` is the index of window 0."""

    ids: np.ndarray
    mask: np.ndarray
    first: int


def batches(window_iter: Iterator[list[int]], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Group windows into batches; a short last window is right-padded and masked."""
    index = 0
    for group in _grouped(window_iter, batch_size):
        length = max(len(w) for w in group)
        ids = np.full((len(group), length), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), length), dtype=bool)
        for row, window in enumerate(group):
            ids[row, :len(window)] = window
            mask[row, :len(window)] = True
        yield Batch(ids, mask, index)
        index += len(group)
