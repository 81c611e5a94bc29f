"""Match the latents of two crosscoders through a release both of them read.

Crosscoder P covers releases (..., R) and crosscoder N covers (R, ...). Both have decoder
rows for R's sources, which correspond one to one (same site, layer and width; the rule of
xcli.analysis.classify.corresponding_sources). For latents i of P and j of N:

  decoder_cosine[i, j]        cosine of their decoders over R's sources, concatenated, in raw
                              units (decoder / input scale), so that the two crosscoders'
                              normalisations drop out
  activation_agreement[i, j]  with a store: Pearson correlation of f_i(x) under P and f_j(x)
                              under N over the same tokens x (0 where a latent never fires)
  confidence[i, j]            decoder_cosine alone without a store, else the mean
                              (max(cosine, 0) + max(agreement, 0)) / 2

The matches are one-to-one pairs of eligible latents (alive in R on both sides) with
confidence >= `min_confidence`: the maximum-weight matching over those pairs with weight
confidence - min_confidence, solved exactly by the Hungarian algorithm per connected
component of the allowed pairs (xcli.track.assign.assign_above). Unmatched latents of P end in R ("gone" after it);
unmatched latents of N start there ("new").
"""

from dataclasses import dataclass

import numpy as np
import torch

from xcli.analysis.classify import corresponding_sources, model_groups
from xcli.analysis.latent_stats import check_store
from xcli.crosscoder.model import Crosscoder
from xcli.data.store import ActivationStore
from xcli.errors import BadInput
from xcli.track.assign import assign_above


def release_decoders(model: Crosscoder, sources) -> np.ndarray:
    """(F, sum of d) decoder rows of the given sources, raw units, concatenated."""
    with torch.no_grad():
        return np.concatenate([(model.decoder_weight(s.name) / model.scale(s.name)).detach().cpu().double().numpy()
                               for s in sources], axis=1)


def shared_sources(before: Crosscoder, after: Crosscoder, release: str):
    """The sources of `release` in both crosscoders, paired one to one."""
    groups = {}
    for label, model in (("before", before), ("after", after)):
        match = [g for g in model_groups(model) if g.model == release]
        if not match:
            raise BadInput(f"the {label} crosscoder writes no decoder for release {release!r}; "
                           f"its models are: {', '.join(g.model for g in model_groups(model))}")
        groups[label] = match[0]
    pairs = corresponding_sources(groups["before"], groups["after"])
    if pairs is None:
        raise BadInput(f"release {release!r} has different sources in the two crosscoders "
                       f"({[s.name for s in groups['before'].sources]} and {[s.name for s in groups['after'].sources]}); "
                       "they must read the same sites and layers of it")
    return pairs


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosines (rows of a x rows of b); 0 where a row is zero."""
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    return (a / np.where(na > 0, na, 1)) @ (b / np.where(nb > 0, nb, 1)).T


class Correlation:
    """Pearson correlations between the columns of two streams of matrices, accumulated in float64."""

    def __init__(self, n_a: int, n_b: int):
        self.n = 0
        self.sum_a, self.sum_b = np.zeros(n_a), np.zeros(n_b)
        self.sq_a, self.sq_b = np.zeros(n_a), np.zeros(n_b)
        self.cross = np.zeros((n_a, n_b))

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = a.astype(np.float64), b.astype(np.float64)
        self.n += len(a)
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += (a * a).sum(0)
        self.sq_b += (b * b).sum(0)
        self.cross += a.T @ b

    def result(self) -> np.ndarray:
        n = self.n
        cov = n * self.cross - np.outer(self.sum_a, self.sum_b)
        var_a = np.maximum(n * self.sq_a - self.sum_a ** 2, 0)
        var_b = np.maximum(n * self.sq_b - self.sum_b ** 2, 0)
        scale = np.sqrt(np.outer(var_a, var_b))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(scale > 0, cov / np.where(scale > 0, scale, 1), 0.0)


@dataclass
class StorePass:
    """What one pass over a common store gives for a crosscoder."""

    frequency: np.ndarray  # (F,)
    top_rows: np.ndarray  # (F, k) store rows, strongest first; -1 where fewer fire
    top_values: np.ndarray  # (F, k)


def find_sources(model: Crosscoder, stores: list[ActivationStore]) -> dict[str, ActivationStore]:
    """For each source the crosscoder reads, a store that holds it."""
    where = {}
    for name in model.read:
        holder = next((s for s in stores if name in s.names), None)
        if holder is None:
            raise BadInput(f"no --store holds source {name!r}, which a crosscoder reads; the stores hold: "
                           f"{', '.join(sorted({n for s in stores for n in s.names}))}")
        check_store(model, holder, [name])
        where[name] = holder
    return where


def check_lined_up(stores: list[ActivationStore]) -> int:
    """The number of rows every store has, checking that they hold the same tokens."""
    counts = {s.n_tokens for s in stores}
    if len(counts) != 1:
        raise BadInput("the --store stores must hold the same tokens, rows lined up; they hold "
                       + ", ".join(f"{s.n_tokens} ({s.path})" for s in stores) + " rows")
    tokens = [t["tokens"] for t in (s.token_arrays() for s in stores) if t is not None]
    if any(not np.array_equal(tokens[0], t) for t in tokens[1:]):
        raise BadInput("the --store stores hold different tokens; harvest them from the same corpus with the "
                       "same --context-length and --tokens")
    return counts.pop()


def encode_stores(models: list[Crosscoder], stores: list[ActivationStore], max_tokens: int | None, top: int,
                  batch_rows: int, device, on_batch=None) -> list[StorePass]:
    """Encode the same rows with every model; `on_batch(list of (B, F) arrays)` sees each batch."""
    n_rows = check_lined_up(stores)
    if max_tokens is not None:
        n_rows = min(n_rows, max_tokens)
    sources = [find_sources(m, stores) for m in models]
    counts = [np.zeros(m.n_latents) for m in models]
    best_vals = [np.full((m.n_latents, top), -np.inf) for m in models]
    best_rows = [np.full((m.n_latents, top), -1, dtype=np.int64) for m in models]
    for m in models:
        m.eval().to(device)
    with torch.no_grad():
        for start in range(0, n_rows, batch_rows):
            stop = min(start + batch_rows, n_rows)
            cache: dict = {}
            batch = []
            for k, (model, where) in enumerate(zip(models, sources)):
                x = {}
                for name, store in where.items():
                    key = (id(store), name)
                    if key not in cache:
                        cache[key] = torch.from_numpy(store.read(name, start, stop)).to(device)
                    x[name] = cache[key]
                f = model.encode(x, batch_select=False).float().cpu().numpy()
                counts[k] += (f > 0).sum(0)
                if top:
                    vals = np.concatenate([best_vals[k], f.T], axis=1)
                    rows = np.concatenate([best_rows[k], np.broadcast_to(np.arange(start, stop), f.T.shape)], axis=1)
                    keep = np.argsort(-vals, axis=1, kind="stable")[:, :top]
                    best_vals[k] = np.take_along_axis(vals, keep, 1)
                    best_rows[k] = np.take_along_axis(rows, keep, 1)
                batch.append(f)
            if on_batch is not None:
                on_batch(batch)
    out = []
    for k in range(len(models)):
        fired = best_vals[k] > 0
        out.append(StorePass(counts[k] / max(n_rows, 1), np.where(fired, best_rows[k], -1),
                             np.where(fired, best_vals[k], 0.0)))
    return out


@dataclass
class Matching:
    """The matches between eligible latents of `before` and `after` over one release."""

    pairs: list[tuple[int, int]]  # (latent before, latent after) with confidence >= min_confidence
    decoder_cosine: np.ndarray  # (F_before, F_after)
    agreement: np.ndarray | None  # (F_before, F_after) or None without a store
    confidence: np.ndarray  # (F_before, F_after)
    eligible_before: np.ndarray  # latent indices
    eligible_after: np.ndarray
    passes: list[StorePass] | None = None

    @property
    def fraction_matched(self) -> float:
        """Matches over the eligible latents of the smaller side."""
        n = min(len(self.eligible_before), len(self.eligible_after))
        return len(self.pairs) / n if n else 0.0


def confidence_of(cosine: np.ndarray, agreement: np.ndarray | None) -> np.ndarray:
    if agreement is None:
        return cosine
    return (np.maximum(cosine, 0) + np.maximum(agreement, 0)) / 2


def match(before: Crosscoder, after: Crosscoder, release: str, eligible_before=None, eligible_after=None,
          stores: list[ActivationStore] = (), min_confidence: float = 0.5, max_tokens: int | None = None,
          top: int = 0, batch_rows: int = 4096, device="cpu") -> Matching:
    """Match latents of `before` (eligible_before: indices; default all) with those of `after` through
    `release`; see the module docstring."""
    pairs = shared_sources(before, after, release)
    cos = cosine_matrix(release_decoders(before, [a for a, _ in pairs]), release_decoders(after, [b for _, b in pairs]))
    rows = np.arange(before.n_latents) if eligible_before is None else np.asarray(eligible_before, dtype=np.int64)
    cols = np.arange(after.n_latents) if eligible_after is None else np.asarray(eligible_after, dtype=np.int64)
    agreement, passes = None, None
    if stores:
        corr = Correlation(len(rows), len(cols))
        passes = encode_stores([before, after], list(stores), max_tokens, top, batch_rows, device,
                               on_batch=lambda fs: corr.add(fs[0][:, rows], fs[1][:, cols]))
        agreement = np.zeros_like(cos)
        agreement[np.ix_(rows, cols)] = corr.result()
    confidence = confidence_of(cos, agreement)
    sub = confidence[np.ix_(rows, cols)]
    chosen = [(int(rows[r]), int(cols[c])) for r, c in assign_above(sub, min_confidence)]
    return Matching(chosen, cos, agreement, confidence, rows, cols, passes)
