"""Spliced-in next-token loss: how much of each model's behaviour the crosscoder keeps.

For each batch of token windows:

1. every model runs clean; forward hooks record its sources' activations and
   we keep its next-token log-probabilities;
2. the crosscoder encodes the recorded activations of all models at the spliced
   positions and decodes them (raw units);
3. each model that has written sources runs twice more, with those activations
   replaced by the reconstruction (spliced) and by zeros (ablated), at every
   source of that model at once.

Spliced positions are the rows the crosscoder was trained on: the positions a
store holds (special tokens such as BOS are not harvested and stay clean), or,
for --data text, the positions of non-special tokens. A position's prediction
of the next token is scored when that position is spliced, has a next token in
its window, and (for a store) its row is one of the rows being evaluated:

    CE   = mean over scored positions of -log p(next token)
    KL   = mean over scored positions of sum_v p_clean(v) (log p_clean(v) - log p(v))

Sites are resolved as `xc harvest` resolves them (xcli.lm.sites: resid_post = block
output, resid_pre = block input, mlp_out/attn_out = what that sublayer adds to the
residual stream, or a module path).
"""

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from xcli import console
from xcli.data.loader import StoreSet
from xcli.errors import BadInput
from xcli.lm.config import ModelSpec
from xcli.lm.models import (
    check_same_tokenizer,
    context_limit,
    fast_dtype,
    load_causal_lm,
    load_tokenizer,
    sources_of_model,
)
from xcli.lm.sites import Site, hook_site, resolve_site
from xcli.source import Source


@dataclass(frozen=True)
class SpliceConfig:
    models: tuple[str, ...] = ()
    """ALIAS=PATH[@REVISION] of each model; default: the models the store's harvest recorded."""
    data: str | None = None
    """A text file, one sequence per line; default: the store's own token windows."""
    windows: int = 64
    """Windows (sequences) measured, at most."""
    window_batch: int = 4
    """Windows per forward pass."""
    device: str = "cpu"
    dtype: str = "auto"


class Window(NamedTuple):
    ids: np.ndarray
    """(T,) token ids."""
    splice: np.ndarray
    """(T,) positions whose activations are replaced."""
    score: np.ndarray
    """(T,) positions whose next-token prediction is scored."""


# -- the scores ---------------------------------------------------------------------------------

def ce_score(ce_ablate: float, ce_spliced: float, ce_clean: float) -> float | None:
    """(CE_ablate - CE_spliced) / (CE_ablate - CE_clean): 1 = as good as clean, 0 = as bad as
    ablating. None when ablation does not change the loss (the score is undefined)."""
    denominator = ce_ablate - ce_clean
    return (ce_ablate - ce_spliced) / denominator if denominator != 0 else None


def kl_score(kl_ablate: float, kl_spliced: float) -> float | None:
    """(KL_ablate - KL_spliced) / KL_ablate, KL measured against the clean model; None when KL_ablate is 0."""
    return (kl_ablate - kl_spliced) / kl_ablate if kl_ablate != 0 else None


# -- token windows ---------------------------------------------------------------------------------

def store_windows(stores: StoreSet, chunks, limit: int) -> list[Window]:
    """Rebuild up to `limit` of the store's context windows that hold evaluated rows (those of
    `chunks`), spread evenly over them. Positions a harvest left out (BOS, document separators)
    are filled in from the packing the store records."""
    store = next((s for s in stores.stores if all(k in s.group for k in ("tokens", "sequence", "position"))),
                 None)
    if store is None:
        raise BadInput("the store has no token windows (tokens/sequence/position arrays); pass --data TEXT_FILE")
    sequence, position, tokens = store.group["sequence"], store.group["position"], store.group["tokens"]
    n, chunk_rows = stores.n_tokens, stores.chunk_rows
    rows = spread_rows(stores, chunks, limit)
    evaluated = {int(c) for c in chunks}
    packing = store.meta.get("packing") or {}
    windows, seen = [], set()
    for row in rows:
        seq = int(sequence[row])
        if seq in seen:
            continue
        seen.add(seq)
        lo, hi = window_rows(sequence, row, seq, n)
        pos = np.asarray(position[lo:hi], dtype=np.int64)
        if np.any(np.diff(pos) <= 0):
            raise BadInput(f"rows {lo}-{hi - 1} of sequence {seq} are not in position order; the store's token "
                           f"windows cannot be rebuilt: pass --data TEXT_FILE")
        length = int(pos[-1]) + 1
        if hi < n and packing.get("context_length"):
            length = int(packing["context_length"])  # only the corpus's last window is shorter
        ids = np.full(length, -1, dtype=np.int64)
        ids[pos] = np.asarray(tokens[lo:hi], dtype=np.int64)
        fill_gaps(ids, packing, seq)
        splice = np.zeros(length, dtype=bool)
        splice[pos] = True
        score = np.zeros(length, dtype=bool)
        row_ids = np.arange(lo, hi)
        score[pos] = np.isin(row_ids // chunk_rows, list(evaluated)) & (pos < length - 1)
        windows.append(Window(ids, splice, score))
    return windows


def spread_rows(stores: StoreSet, chunks, limit: int) -> list[int]:
    """Up to `limit` rows of the evaluated chunks, spread evenly over them, in store order."""
    ranges = [stores.chunk_range(int(c)) for c in sorted(int(c) for c in chunks)]
    offsets = np.cumsum([0] + [b - a for a, b in ranges])
    count = min(limit, int(offsets[-1]))
    picks = ((np.arange(count) + 0.5) * offsets[-1] / count).astype(np.int64)
    rows = []
    for pick in picks:  # the pick-th evaluated row, in store order
        i = int(np.searchsorted(offsets, pick, "right")) - 1
        rows.append(ranges[i][0] + int(pick - offsets[i]))
    return rows


def window_rows(sequence, row: int, seq: int, n: int, block: int = 1024) -> tuple[int, int]:
    """[lo, hi): the rows of sequence `seq` around `row` (rows of one window are contiguous)."""
    lo = row
    while lo > 0:
        start = max(0, lo - block)
        part = np.asarray(sequence[start:lo])
        other = np.nonzero(part != seq)[0]
        if len(other):
            lo = start + int(other[-1]) + 1
            break
        lo = start
    hi = row + 1
    while hi < n:
        stop = min(n, hi + block)
        part = np.asarray(sequence[hi:stop])
        other = np.nonzero(part != seq)[0]
        if len(other):
            hi = hi + int(other[0])
            break
        hi = stop
    return lo, hi


def fill_gaps(ids: np.ndarray, packing: dict, seq: int) -> None:
    """Fill positions with no stored row: the packing prefix (e.g. BOS) at the start, its
    suffix at the end, the document separator between."""
    gaps = np.nonzero(ids < 0)[0]
    if not len(gaps):
        return
    prefix, suffix, separator = packing.get("prefix"), packing.get("suffix", []), packing.get("separator")
    if prefix is None or separator is None:
        raise BadInput(f"window {seq} has positions with no stored row and the store records no packing "
                       f"to fill them from; pass --data TEXT_FILE")
    suffix_start = len(ids) - len(suffix)
    for p in gaps:
        if p < len(prefix):
            ids[p] = prefix[p]
        elif p >= suffix_start:
            ids[p] = suffix[p - suffix_start]
        elif len(separator) == 1:
            ids[p] = separator[0]
        else:
            raise BadInput(f"position {p} of window {seq} has no stored row and is not in the packing prefix; "
                           f"pass --data TEXT_FILE")


def data_lines(path: str) -> list[str]:
    """The non-empty lines of --data, a UTF-8 text file with one sequence per line."""
    if not Path(path).is_file():
        raise BadInput(f"--data {path!r} does not exist (give a text file with one sequence per line)")
    try:
        return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise BadInput(f"--data {path!r} is not UTF-8 text") from None


def text_windows(path: str, tokenizer, limit: int, context: int | None) -> list[Window]:
    """One window per non-empty line of a text file (the tokenizer adds its special tokens),
    cut to the models' context length."""
    lines = data_lines(path)
    special = set(tokenizer.all_special_ids)
    windows, cut = [], 0
    for line in lines[:limit]:
        ids = np.asarray(tokenizer(line)["input_ids"], dtype=np.int64)
        if context and len(ids) > context:
            ids, cut = ids[:context], cut + 1
        splice = ~np.isin(ids, list(special))
        score = splice & (np.arange(len(ids)) < len(ids) - 1)
        windows.append(Window(ids, splice, score))
    if cut:
        console.warn(f"{cut} lines of --data are longer than the models' context ({context} tokens) and were cut")
    return windows


# -- hooks -------------------------------------------------------------------------------------------

def find_site(model, source: Source) -> Site:
    """Where a harvested source lives in a causal LM, resolved as `xc harvest` resolved it."""
    return resolve_site(model, source.site, source.layer, source.model)


class SiteHooks:
    """Forward hooks at a model's sources: record their activations, or overwrite them at the
    masked positions (`replace`: source -> (N, d) rows in mask order)."""

    def __init__(self, model, sources: list[Source]):
        self.model, self.sources = model, sources
        self.sites = {s.name: find_site(model, s) for s in sources}
        self.captured: dict[str, Tensor] = {}
        self.replace: dict[str, Tensor] | None = None
        self.mask: Tensor | None = None
        self.handles = []

    def __enter__(self):
        self.handles = [hook_site(site, lambda hidden, name=name: self.edit(name, hidden))
                        for name, site in self.sites.items()]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def edit(self, name: str, hidden: Tensor) -> Tensor:
        if self.replace is None:
            self.captured[name] = hidden.detach()
            return hidden
        if name not in self.replace:
            return hidden
        new = hidden.clone()
        new[self.mask] = self.replace[name].to(hidden.dtype)
        return new

    def run(self, ids: Tensor, attention: Tensor, replace: dict[str, Tensor] | None = None,
            mask: Tensor | None = None) -> Tensor | None:
        """Log-probabilities (B, T, V) in float32 (None for a model without a language-model head);
        records activations when `replace` is None."""
        self.captured, self.replace, self.mask = {}, replace, mask
        try:
            logits = getattr(self.model(input_ids=ids, attention_mask=attention), "logits", None)
        finally:
            self.replace = self.mask = None
        if replace is None:
            for s in self.sources:
                got = self.captured.get(s.name)
                if got is None:
                    raise BadInput(f"site of source {s.name} never ran in the forward pass")
                if got.shape[-1] != s.d:
                    raise BadInput(f"source {s.name} has width {s.d} in the checkpoint but its site gives "
                                   f"{got.shape[-1]}; the checkpoint was not trained on this model")
        return None if logits is None else torch.log_softmax(logits.float(), dim=-1)


# -- the measurement -----------------------------------------------------------------------------------

def model_specs(crosscoder, stores: StoreSet, given: tuple[str, ...]) -> list[tuple[ModelSpec, list[Source]]]:
    """Each model to load, with the crosscoder's sources that live in it."""
    if given:
        specs = [(ModelSpec.parse(m), m) for m in given]
    else:
        specs, seen = [], set()
        for store in stores.stores:
            for m in (store.meta.get("harvest") or {}).get("models", []):
                if m.get("alias") not in seen:
                    seen.add(m.get("alias"))
                    specs.append((ModelSpec(m["alias"], m["id"], m.get("revision")), m["id"]))
        if not specs:
            raise BadInput("the store records no models (it was not written by xc harvest); "
                           "pass --model ALIAS=PATH for each model of the crosscoder")
    out, covered = [], set()
    for spec, text in specs:
        try:
            mine = sources_of_model(crosscoder, spec, text)
        except BadInput:
            if given:
                raise
            continue  # a harvested model the crosscoder does not use
        out.append((spec, mine))
        covered.update(s.name for s in mine)
    missing = [n for n in crosscoder.read if n not in covered]
    if missing:
        models = sorted({s.model for s in crosscoder.sources if s.name in missing})
        raise BadInput(f"the crosscoder reads {', '.join(missing)} from model(s) {', '.join(models)}, which "
                       f"were not given; pass --model ALIAS=PATH for each")
    return out


def spliced_loss(crosscoder, stores: StoreSet, chunks, cfg: SpliceConfig) -> dict:
    """CE clean/spliced/ablated, CE score and KL score for each model with written sources."""

    aligned = next((s for s in stores.stores if s.alignment), None)
    if aligned is not None:  # models with different tokenizers: each runs its own tokens
        raise BadInput(f"store {str(aligned.path)!r} aligns models with different tokenizers (xc harvest --align); "
                       f"its spliced-in loss is xcli.analysis.splice_aligned.aligned_spliced_loss")
    device = torch.device(cfg.device)
    dtype = fast_dtype(cfg.dtype, device)
    specs = model_specs(crosscoder, stores, cfg.models)
    tokenizer = load_tokenizer(specs[0][0])
    for spec, _ in specs[1:]:
        check_same_tokenizer(tokenizer, load_tokenizer(spec), f"model {specs[0][0].id!r}", f"model {spec.id!r}")
    models = [load_causal_lm(spec, device, dtype) for spec, _ in specs]
    if cfg.data is not None:
        contexts = [c for c in map(context_limit, models) if c]
        windows = text_windows(cfg.data, tokenizer, cfg.windows, min(contexts) if contexts else None)
    else:
        windows = store_windows(stores, chunks, cfg.windows)
    if not any(w.score.any() for w in windows):
        raise BadInput("no position to score: every window is shorter than two spliced tokens")
    hooks = [SiteHooks(model, sources) for model, (_, sources) in zip(models, specs)]
    written = [[s.name for s in sources if s.name in crosscoder.write] for _, sources in specs]
    sums = [new_sums() for _ in specs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode(), ExitStack() as stack:
        for hook in hooks:
            stack.enter_context(hook)
        bar = stack.enter_context(console.progress(total=len(windows), desc="splice", unit="window"))
        for start in range(0, len(windows), cfg.window_batch):
            batch = windows[start:start + cfg.window_batch]
            splice_batch(crosscoder, models, hooks, written, batch, pad, device, sums)
            bar.update(len(batch))
    out = {}
    for (spec, _), names, total in zip(specs, written, sums):
        if not names:
            continue
        out[spec.alias] = {"path": spec.id, "sources": names, "windows": len(windows), **scores(total)}
    return out


def scores(total: dict) -> dict:
    """The reported means and scores of one model's sums (add_scores)."""
    n = total["tokens"]
    ce = {k: total[k] / n for k in ("ce_clean", "ce_spliced", "ce_ablated")}
    kl = {k: total[k] / n for k in ("kl_spliced", "kl_ablated")}
    return {"tokens": int(n), **ce, "ce_increase": ce["ce_spliced"] - ce["ce_clean"],
            "ce_score": ce_score(ce["ce_ablated"], ce["ce_spliced"], ce["ce_clean"]), **kl,
            "kl_score": kl_score(kl["kl_ablated"], kl["kl_spliced"])}


def new_sums() -> dict:
    return dict.fromkeys(("tokens", "ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated"), 0.0)


def add_scores(total: dict, ids: Tensor, score: Tensor, clean: Tensor, spliced: Tensor, ablated: Tensor) -> None:
    """Add the predictions at the `score` positions (B, T) of windows `ids` (B, T) to `total`, from the
    log-probabilities (B, T, V) of the clean, spliced and ablated runs."""
    targets, scored = ids[:, 1:], score[:, :-1]
    clean_s = clean[:, :-1][scored]  # (N, V)
    t = targets[scored].unsqueeze(1)
    total["tokens"] += int(scored.sum())
    total["ce_clean"] += float(-clean_s.gather(1, t).double().sum())
    p_clean = clean_s.exp()
    for key, logp in (("spliced", spliced), ("ablated", ablated)):
        other = logp[:, :-1][scored]
        total[f"ce_{key}"] += float(-other.gather(1, t).double().sum())
        total[f"kl_{key}"] += float((p_clean * (clean_s - other)).double().sum())


def pad_windows(windows: list[Window], pad: int, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ids, attention mask, splice mask and score mask, (B, T), right-padded."""
    T = max(len(w.ids) for w in windows)
    ids = np.full((len(windows), T), pad, dtype=np.int64)
    attention, splice, score = (np.zeros((len(windows), T), dtype=bool) for _ in range(3))
    for b, w in enumerate(windows):
        ids[b, :len(w.ids)], attention[b, :len(w.ids)] = w.ids, True
        splice[b, :len(w.ids)], score[b, :len(w.ids)] = w.splice, w.score
    return tuple(torch.from_numpy(a).to(device) for a in (ids, attention.astype(np.int64), splice, score))


def splice_batch(crosscoder, models, hooks: list[SiteHooks], written: list[list[str]], batch: list[Window],
                 pad: int, device, sums: list[dict]) -> None:
    ids, attention, splice, score = pad_windows(batch, pad, device)
    clean, captured = [], {}
    for hook in hooks:
        clean.append(hook.run(ids, attention))
        captured.update({name: value[splice].float() for name, value in hook.captured.items()})
    x = {name: captured[name].to(crosscoder.b_enc.device) for name in crosscoder.read}
    recon = {name: value.to(device) for name, value in crosscoder.decode(crosscoder.encode(x)).items()}
    for hook, names, logp_clean, total in zip(hooks, written, clean, sums):
        if not names:
            continue
        spliced = hook.run(ids, attention, {n: recon[n] for n in names}, splice)
        ablated = hook.run(ids, attention, {n: torch.zeros_like(recon[n]) for n in names}, splice)
        add_scores(total, ids, score, logp_clean, spliced, ablated)
