"""Label every latent of a crosscoder: shared, exclusive to one model, mixed or dead.

Written sources are grouped by their model; a cross-layer crosscoder of one model
is one group. All norms are in the checkpoint's normalised units. Per latent i:

  norm[m]               ||d_m||: L2 norm of latent i's decoder rows over the sources of
                        model m, concatenated
  share[m]              ||d_m|| / sum over models of ||d_m'||
  rel_norm_B_over_A     r = ||d_B|| / (||d_A|| + ||d_B||): 0 = A only, 0.5 even, 1 = B only
                        (Lindsey et al. 2024). With two models it is B's share.
  delta_norm_B_over_A   ((||d_B|| - ||d_A||) / max(||d_A||, ||d_B||) + 1) / 2, the
                        max-normalised score of Minder et al. 2025 in the same orientation
                        (1 = B only). Their bins (0.1 / [0.4, 0.6) / 0.9) refer to THIS
                        statistic; r <= 0.1 is a stricter cut than delta <= 0.1.
  cosine_A_B            cosine of the decoder vectors of A and B; only when the two models'
                        sources correspond one to one (same site, layer and width)

Classes, checked in this order (Thresholds below; defaults in brackets):
  dead           never fires on the store (frequency <= dead_frequency [0]), or has no
                 decoder norm at all
  exclusive:<m>  model m holds >= exclusive_share [0.9] of the norm; for two models this is
                 r <= 0.1 (exclusive:A) or r >= 0.9 (exclusive:B). A one-model crosscoder
                 has only exclusive:<m> and dead.
  shared         two models: shared_band[0] <= r <= shared_band[1] [0.3, 0.7]; more models:
                 every model holds at least 2 * shared_band[0] / n_models of the norm
  mixed          anything else

With a store, one pass over its rows (in token batches of at most batch_elements / F
rows, so nothing of size tokens x F exists beyond one batch) adds activation frequency,
mean activation over the tokens where the latent fires, max activation, Latent Scaling
and, for cross-layer crosscoders, functional coherence.

Latent Scaling (Minder et al. 2025). For the pair A, B (sources corresponding), the
fitted direction of latent j is the decoder vector d of its larger side (the "owner",
written ls_direction). For each model m, beta is the least-squares scale of f_j d
against a target y over the store:  beta = sum_x f_j <d, y> / (||d||^2 sum_x f_j^2),
accumulated exactly in one pass. Targets, in normalised units:
  error           y = a_m - (a_hat_m - f_j d_j^m): the model's reconstruction error with
                  latent j's own term added back
  reconstruction  y = a_hat_m for the owner; a_hat_m - f_j d_j^m for the other model, so
                  that its beta counts only what OTHER latents rebuild along d
  nu_epsilon = beta_error[other] / beta_error[owner],
  nu_r       = beta_reconstruction[other] / beta_reconstruction[owner].
Verdict for exclusive latents (thresholds of the paper's figures): "specific" when
nu_epsilon < 0.2 and nu_r < 0.5; otherwise the exclusivity is a sparsity artifact:
"shrinkage" (nu_epsilon high: the other model carries the direction in its error, so
the L1 penalty shrank its decoder to zero: Complete Shrinkage), "decoupling" (nu_r
high: other latents rebuild the direction in the other model: Latent Decoupling), or
"shrinkage+decoupling"; "undetermined" when the latent never fires or its owner beta
is not positive.

Cross-layer profile: written sources are pooled by layer (L2 over the sources of a
layer), layer_share[l] = norm_l / sum_l norm_l, peak_layer = argmax, span_layers =
layers with share >= span_share [0.1]. Functional coherence (fmxcoders, Demou et al.
2026, as adapted in methods.md section 3): zero the encoder input of one layer at a
time; delta_l = sum_x |f_j(x) - f_j^(-l)(x)| / (sum_x f_j(x) + 1e-8), the
activation-weighted relative change; coherence = sum_l delta_l / max_l delta_l, the
effective number of layers driving the latent, from 1 (one layer) to L (all equally).
"""

import csv
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from xcli import console
from xcli.crosscoder import Crosscoder
from xcli.errors import BadInput
from xcli.store import ActivationStore, Source

FORMATS = ("jsonl", "csv", "table")
COHERENCE_EPS = 1e-8
DEAD_NORM = 1e-8  # a latent whose decoder rows sum to less than this writes nothing


@dataclass(frozen=True)
class ClassifyConfig:
    models: tuple[str, str] | None = None
    """Models A and B compared by r, delta norm, cosine and Latent Scaling (B over A).
    Default: the two models in checkpoint order when there are exactly two."""
    exclusive_share: float = 0.9
    """Exclusive to a model when it holds at least this share of the decoder norm."""
    shared_band: tuple[float, float] = (0.3, 0.7)
    """Shared when low <= r <= high (two models)."""
    dead_frequency: float = 0.0
    """Dead when the latent fires on at most this fraction of the store's tokens."""
    nu_epsilon: float = 0.2
    """Latent Scaling: nu_epsilon at or above this flags Complete Shrinkage."""
    nu_r: float = 0.5
    """Latent Scaling: nu_r at or above this flags Latent Decoupling."""
    span_share: float = 0.1
    """A layer is in a latent's span when it holds at least this share of its norm."""
    max_tokens: int | None = None
    """Use only the first max_tokens rows of the store."""
    batch_elements: int = 1 << 22
    """At most this many tokens x latents per batch in the store pass."""
    device: str = "cpu"

    def __post_init__(self):
        if self.models is not None and (len(self.models) != 2 or self.models[0] == self.models[1]):
            raise BadInput(f"--models {','.join(self.models)!r} must name two different models, as A,B")
        if not 0.5 < self.exclusive_share <= 1:
            raise BadInput(f"--exclusive-share {self.exclusive_share} must be above 0.5 and at most 1")
        low, high = self.shared_band
        if not 0 <= low <= high <= 1:
            raise BadInput(f"--shared-band {low},{high} must be LOW,HIGH with 0 <= LOW <= HIGH <= 1")
        if not 0 <= self.dead_frequency < 1:
            raise BadInput(f"--dead-frequency {self.dead_frequency} must be in [0, 1)")
        if self.nu_epsilon <= 0 or self.nu_r <= 0:
            raise BadInput(f"--nu-epsilon {self.nu_epsilon} and --nu-r {self.nu_r} must be positive")
        if not 0 < self.span_share <= 1:
            raise BadInput(f"--span-share {self.span_share} must be in (0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise BadInput(f"--max-tokens {self.max_tokens} must be at least 1")
        if self.batch_elements < 1:
            raise BadInput(f"batch_elements {self.batch_elements} must be at least 1")


@dataclass(frozen=True)
class Group:
    """The written sources of one model, as columns of Crosscoder.decoder_norms()."""

    model: str
    sources: tuple[Source, ...]
    columns: tuple[int, ...]


def model_groups(model: Crosscoder) -> list[Group]:
    """Written sources grouped by model, in order of first appearance."""
    by_name = {s.name: s for s in model.sources}
    groups: dict[str, list[tuple[int, Source]]] = {}
    for column, name in enumerate(model.write):
        groups.setdefault(by_name[name].model, []).append((column, by_name[name]))
    return [Group(m, tuple(s for _, s in members), tuple(c for c, _ in members)) for m, members in groups.items()]


def corresponding_sources(a: Group, b: Group) -> list[tuple[Source, Source]] | None:
    """Pairs of sources of A and B with the same site, layer and width, or None unless one to one."""
    key = lambda s: (s.site, s.layer, s.d)  # noqa: E731
    b_by_key = {key(s): s for s in b.sources}
    if len(a.sources) != len(b.sources) or len(b_by_key) != len(b.sources):
        return None
    pairs = [(s, b_by_key.get(key(s))) for s in a.sources]
    return None if any(t is None for _, t in pairs) else pairs


def relative_norm(norm_a, norm_b) -> np.ndarray:
    """r = ||d_B|| / (||d_A|| + ||d_B||); NaN where both are zero."""
    a, b = np.asarray(norm_a, dtype=np.float64), np.asarray(norm_b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return b / (a + b)


def delta_norm(norm_a, norm_b) -> np.ndarray:
    """((||d_B|| - ||d_A||) / max(||d_A||, ||d_B||) + 1) / 2; NaN where both are zero."""
    a, b = np.asarray(norm_a, dtype=np.float64), np.asarray(norm_b, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 0.5 * ((b - a) / np.maximum(a, b) + 1)


def cosine(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity; NaN where a row is zero."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (u * v).sum(1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1))


def assign_classes(shares: np.ndarray, models: list[str], dead: np.ndarray, config: ClassifyConfig,
                   rel_norm: np.ndarray | None = None, pair: tuple[str, str] | None = None) -> list[str]:
    """Class of each latent from its norm shares (F, n_models); see the module docstring.

    With two models, pass r (B over A) and the pair (A, B): the band applies to r.
    """
    low, high = config.shared_band
    n = len(models)
    classes = []
    for i in range(shares.shape[0]):
        row = shares[i]
        if dead[i] or not np.all(np.isfinite(row)):
            classes.append("dead")
        elif row.max() >= config.exclusive_share:
            classes.append(f"exclusive:{models[int(row.argmax())]}")
        elif n == 2 and rel_norm is not None and low <= rel_norm[i] <= high:
            classes.append("shared")
        elif n > 2 and row.min() >= 2 * low / n:
            classes.append("shared")
        else:
            classes.append("mixed")
    return classes


def scaling_verdict(nu_eps: float, nu_r: float, beta_owner_err: float, beta_owner_rec: float,
                    fires: bool, config: ClassifyConfig) -> str:
    if not fires or not (beta_owner_err > 0 and beta_owner_rec > 0):
        return "undetermined"
    shrinkage, decoupling = nu_eps >= config.nu_epsilon, nu_r >= config.nu_r
    if shrinkage and decoupling:
        return "shrinkage+decoupling"
    return "shrinkage" if shrinkage else "decoupling" if decoupling else "specific"


@dataclass
class Classification:
    """Per-latent arrays (F rows) and what they were computed with. `rows()` gives the JSON lines."""

    config: ClassifyConfig
    groups: list[Group]
    source_names: list[str]
    source_norm: np.ndarray  # (F, S)
    norm: np.ndarray  # (F, G)
    share: np.ndarray  # (F, G)
    classes: list[str]
    pair: tuple[str, str] | None = None
    rel_norm: np.ndarray | None = None
    delta_norm: np.ndarray | None = None
    cosine: np.ndarray | None = None
    layers: list[int] | None = None
    layer_share: np.ndarray | None = None  # (F, L)
    n_tokens: int = 0
    activity: dict | None = None  # frequency, mean_activation, max_activation: (F,)
    scaling: dict | None = None  # beta_error, beta_reconstruction (F, 2; A, B), nu_epsilon, nu_r, owner, verdict
    coherence: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_latents(self) -> int:
        return self.norm.shape[0]

    @property
    def models(self) -> list[str]:
        return [g.model for g in self.groups]

    def rows(self):
        """One dict per latent, JSON-ready (NaN becomes None)."""
        models, cross_models = self.models, len(self.groups) > 1
        for i in range(self.n_latents):
            row = {"latent": i, "class": self.classes[i]}
            row["norm"] = {m: _num(self.norm[i, g]) for g, m in enumerate(models)}
            if cross_models:
                row["share"] = {m: _num(self.share[i, g]) for g, m in enumerate(models)}
            if len(self.source_names) > len(models):
                row["source_norm"] = {s: _num(self.source_norm[i, c]) for c, s in enumerate(self.source_names)}
            if self.pair:
                row["model_A"], row["model_B"] = self.pair
                row["rel_norm_B_over_A"] = _num(self.rel_norm[i])
                row["delta_norm_B_over_A"] = _num(self.delta_norm[i])
                if self.cosine is not None:
                    row["cosine_A_B"] = _num(self.cosine[i])
            if self.activity is not None:
                for key, values in self.activity.items():
                    row[key] = _num(values[i])
            if self.scaling is not None:
                s = self.scaling
                row["ls_direction"] = self.pair[int(s["owner"][i])]
                row["beta_error"] = {m: _num(s["beta_error"][i, k]) for k, m in enumerate(self.pair)}
                row["beta_reconstruction"] = {m: _num(s["beta_reconstruction"][i, k]) for k, m in enumerate(self.pair)}
                row["nu_epsilon"], row["nu_r"] = _num(s["nu_epsilon"][i]), _num(s["nu_r"][i])
                row["ls_verdict"] = s["verdict"][i]
            if self.layer_share is not None:
                shares = self.layer_share[i]
                live = bool(np.all(np.isfinite(shares)))
                row["layer_share"] = {str(layer): _num(shares[k]) for k, layer in enumerate(self.layers)}
                row["peak_layer"] = self.layers[int(shares.argmax())] if live else None
                row["span_layers"] = [layer for k, layer in enumerate(self.layers)
                                      if live and shares[k] >= self.config.span_share]
                row["span"] = len(row["span_layers"])
            if self.coherence is not None:
                row["functional_coherence"] = _num(self.coherence[i])
            yield row

    def summary(self) -> dict:
        counts: dict[str, int] = {}
        for c in self.classes:
            counts[c] = counts.get(c, 0) + 1
        out = {"n_latents": self.n_latents, "models": self.models, "pair": self.pair, "classes": counts,
               "n_tokens": self.n_tokens, "thresholds": {k: v for k, v in asdict(self.config).items()
                                                         if k not in ("device", "batch_elements", "max_tokens")}}
        if self.scaling is not None:
            verdicts: dict[str, int] = {}
            for c, v in zip(self.classes, self.scaling["verdict"]):
                if c.startswith("exclusive:"):
                    verdicts[v] = verdicts.get(v, 0) + 1
            out["ls_verdicts"] = verdicts
        return out


def _num(x) -> float | None:
    x = float(x)
    return None if not math.isfinite(x) else float(f"{x:.7g}")


# -- the computation ---------------------------------------------------------------------

def choose_pair(groups: list[Group], models: tuple[str, str] | None) -> tuple[Group, Group] | None:
    names = [g.model for g in groups]
    if models is None:
        return (groups[0], groups[1]) if len(groups) == 2 else None
    for m in models:
        if m not in names:
            raise BadInput(f"--models names {m!r}, which writes no decoder in this checkpoint; "
                           f"models are: {', '.join(names)}")
    return groups[names.index(models[0])], groups[names.index(models[1])]


def classify(model: Crosscoder, store: ActivationStore | None = None,
             config: ClassifyConfig = ClassifyConfig()) -> Classification:
    """Classify every latent of `model`; with `store`, add activity, Latent Scaling and coherence."""
    groups = model_groups(model)
    by_name = {s.name: s for s in model.sources}
    with torch.no_grad():
        decoders = {n: model.decoder_weight(n).detach().double().cpu().numpy() for n in model.write}
    source_norm = np.stack([np.linalg.norm(decoders[n], axis=1) for n in model.write], axis=1)
    norm = np.stack([np.sqrt((source_norm[:, list(g.columns)] ** 2).sum(1)) for g in groups], axis=1)
    total = norm.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = norm / total[:, None]
    result = Classification(config, groups, list(model.write), source_norm, norm, share, classes=[])

    pair = choose_pair(groups, config.models)
    matched = None
    if pair:
        a, b = pair
        result.pair = (a.model, b.model)
        result.rel_norm = relative_norm(norm[:, groups.index(a)], norm[:, groups.index(b)])
        result.delta_norm = delta_norm(norm[:, groups.index(a)], norm[:, groups.index(b)])
        matched = corresponding_sources(a, b)
        if matched:
            dec_a = np.concatenate([decoders[s.name] for s, _ in matched], axis=1)
            dec_b = np.concatenate([decoders[t.name] for _, t in matched], axis=1)
            result.cosine = cosine(dec_a, dec_b)
        else:
            result.notes.append(f"models {a.model} and {b.model} have no one-to-one corresponding sources "
                                "(same site, layer, width): no cosine and no Latent Scaling")

    layers = [by_name[n].layer for n in model.write]
    if len(set(layers)) > 1 and None not in layers:
        result.layers = sorted(set(layers))
        per_layer = np.stack([np.sqrt((source_norm[:, [c for c, l in enumerate(layers) if l == layer]] ** 2).sum(1))
                              for layer in result.layers], axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.layer_share = per_layer / per_layer.sum(1, keepdims=True)

    dead = total < DEAD_NORM
    if store is not None:
        scan_store(model, store, config, matched, result)
        dead = dead | (result.activity["frequency"] <= config.dead_frequency)

    rel = result.rel_norm if len(groups) == 2 else None
    pair_names = result.pair if len(groups) == 2 else None
    result.classes = assign_classes(share, result.models, dead, config, rel, pair_names)
    if result.scaling is not None:
        s = result.scaling
        fires = result.activity["frequency"] > 0
        s["verdict"] = [
            scaling_verdict(s["nu_epsilon"][i], s["nu_r"][i], s["beta_error"][i, s["owner"][i]],
                            s["beta_reconstruction"][i, s["owner"][i]], bool(fires[i]), config)
            if result.classes[i].startswith("exclusive:") else None
            for i in range(result.n_latents)
        ]
    return result


def _check_store(model: Crosscoder, store: ActivationStore, needed: list[str]) -> None:
    by_name = {s.name: s for s in model.sources}
    for name in needed:
        if name not in store.names:
            raise BadInput(f"store {str(store.path)!r} has no source {name!r}, which the checkpoint needs; "
                           f"it has: {', '.join(store.names)}")
        if store.source(name).d != by_name[name].d:
            raise BadInput(f"source {name!r} is {store.source(name).d} wide in {str(store.path)!r} "
                           f"but {by_name[name].d} in the checkpoint")
    if store.n_tokens == 0:
        raise BadInput(f"store {str(store.path)!r} holds no tokens")


def token_batches(store: ActivationStore, names: list[str], n_tokens: int, rows: int):
    """Row batches of at most `rows`, reading whole store chunks."""
    for start in range(0, n_tokens, store.chunk_rows):
        chunk = store.read_rows(start, min(start + store.chunk_rows, n_tokens), names)
        length = next(iter(chunk.values())).shape[0]
        for b in range(0, length, rows):
            yield {n: a[b:b + rows] for n, a in chunk.items()}


@torch.no_grad()
def scan_store(model: Crosscoder, store: ActivationStore, config: ClassifyConfig,
               matched: list[tuple[Source, Source]] | None, result: Classification) -> None:
    """One pass over the store: fills result.activity, .scaling and .coherence."""
    device = torch.device(config.device)
    model = model.to(device).eval()
    F = model.n_latents
    pair_names = [t.name for pair in (matched or []) for t in pair]
    needed = list(dict.fromkeys(model.read + pair_names))
    _check_store(model, store, needed)
    n_tokens = min(store.n_tokens, config.max_tokens or store.n_tokens)
    rows = max(1, min(store.chunk_rows, config.batch_elements // F))
    by_name = {s.name: s for s in model.sources}

    f64 = dict(dtype=torch.float64, device=device)
    count, f_sum, f_sq = (torch.zeros(F, **f64) for _ in range(3))
    f_max = torch.zeros(F, device=device)

    # Latent Scaling: the fitted direction of each latent is the decoder of its larger side.
    if matched:
        dec_a = torch.cat([model.decoder_weight(s.name) for s, _ in matched], dim=1)  # (F, D)
        dec_b = torch.cat([model.decoder_weight(t.name) for _, t in matched], dim=1)
        owner = (dec_b.norm(dim=1) > dec_a.norm(dim=1)).long()  # 0 = A, 1 = B
        direction = torch.where(owner[:, None].bool(), dec_b, dec_a)  # (F, D)
        s_err, s_rec = torch.zeros(2, F, **f64), torch.zeros(2, F, **f64)

    # Functional coherence: read sources by layer, for cross-layer crosscoders.
    read_layers = sorted({by_name[n].layer for n in model.read if by_name[n].layer is not None})
    do_coherence = len(read_layers) > 1 and all(by_name[n].layer is not None for n in model.read)
    if do_coherence:
        change = torch.zeros(len(read_layers), F, **f64)

    bar = console.progress(total=n_tokens, desc="classify", unit="tok")
    for batch in token_batches(store, needed, n_tokens, rows):
        x = {n: torch.from_numpy(v).to(device) for n, v in batch.items()}
        pre = model.pre_activations(x)  # (B, F)
        f = model.activate(pre, batch_select=False)
        count += (f > 0).sum(0)
        f_sum += f.sum(0, dtype=torch.float64)
        f_sq += (f * f).sum(0, dtype=torch.float64)
        f_max = torch.maximum(f_max, f.max(0).values)

        if matched:
            xn = model.normalise({n: x[n] for n in pair_names})
            recon = model.decode_normalised(f)
            for side in (0, 1):
                names = [pair[side].name for pair in matched]
                y_rec = torch.cat([recon[n] for n in names], dim=1)  # (B, D)
                y_err = torch.cat([xn[n] for n in names], dim=1) - y_rec
                s_err[side] += (f * (y_err @ direction.T)).sum(0, dtype=torch.float64)
                s_rec[side] += (f * (y_rec @ direction.T)).sum(0, dtype=torch.float64)

        if do_coherence:
            for k, layer in enumerate(read_layers):
                masked = pre
                for n in model.read:
                    if by_name[n].layer == layer:
                        masked = masked - (x[n].to(pre.dtype) * model.scale(n)) @ model.encoder_weight(n)
                f_masked = model.activate(masked, batch_select=False)
                change[k] += (f - f_masked).abs().sum(0, dtype=torch.float64)
        bar.update(next(iter(batch.values())).shape[0])
    bar.close()

    fired = count.clamp(min=1)
    result.n_tokens = n_tokens
    result.activity = {
        "frequency": (count / n_tokens).cpu().numpy(),
        "mean_activation": torch.where(count > 0, f_sum / fired, torch.nan).cpu().numpy(),
        "max_activation": f_max.double().cpu().numpy(),
    }
    if matched:
        d = direction.double()
        dd = (d * d).sum(1)  # ||d||^2
        own = torch.stack([(d * dec_a.double()).sum(1), (d * dec_b.double()).sum(1)])  # <d, d_j^m>, (2, F)
        denom = f_sq * dd
        beta_err = (s_err + f_sq * own) / denom  # error with latent j's own term added back
        is_owner = torch.stack([owner == 0, owner == 1])
        beta_rec = torch.where(is_owner, s_rec, s_rec - f_sq * own) / denom  # other side: without j
        idx = torch.arange(F, device=device)
        nu_eps = beta_err[1 - owner, idx] / beta_err[owner, idx]
        nu_r = beta_rec[1 - owner, idx] / beta_rec[owner, idx]
        result.scaling = {
            "owner": owner.cpu().numpy(), "beta_error": beta_err.T.cpu().numpy(),
            "beta_reconstruction": beta_rec.T.cpu().numpy(),
            "nu_epsilon": nu_eps.cpu().numpy(), "nu_r": nu_r.cpu().numpy(),
        }
    if do_coherence:
        delta = (change / (f_sum + COHERENCE_EPS)).cpu().numpy()  # (L, F)
        peak = delta.max(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            result.coherence = np.where(peak > 0, delta.sum(0) / peak, np.nan)


# -- output --------------------------------------------------------------------------------

def flatten(row: dict) -> dict:
    """Nested fields as 'field.key' columns; lists joined by spaces (for CSV)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        elif isinstance(value, list):
            out[key] = " ".join(str(v) for v in value)
        else:
            out[key] = value
    return out


TABLE_COLUMNS = ["latent", "class", "rel_norm_B_over_A", "delta_norm_B_over_A", "cosine_A_B", "frequency",
                 "max_activation", "nu_epsilon", "nu_r", "ls_verdict", "peak_layer", "span", "functional_coherence"]


def write_rows(result: Classification, fmt: str, out) -> None:
    """Write every latent's row to the text stream `out` as JSON lines, CSV or a table."""
    if fmt not in FORMATS:
        raise BadInput(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        for row in result.rows():
            out.write(json.dumps(row) + "\n")
    elif fmt == "csv":
        rows = [flatten(r) for r in result.rows()]
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        from rich.console import Console
        from rich.table import Table

        rows = [flatten(r) for r in result.rows()]
        norm_columns = [k for k in rows[0] if k.startswith("norm.")] if rows else []
        columns = [c for c in TABLE_COLUMNS[:2] + norm_columns + TABLE_COLUMNS[2:] if rows and c in rows[0]]
        table = Table(*columns, box=None)
        for r in rows:
            table.add_row(*[_cell(r.get(c)) for c in columns])
        buffer = io.StringIO()
        Console(file=buffer, width=100_000, no_color=True, highlight=False).print(table)
        out.writelines(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_summary(result: Classification, file=None) -> None:
    """The class counts (and Latent Scaling verdicts) as a small table on stderr."""
    from rich.console import Console
    from rich.table import Table

    summary = result.summary()
    n = summary["n_latents"]
    cfg = result.config
    thresholds = f"exclusive: one model holds >= {cfg.exclusive_share} of the decoder norm"
    if result.pair:
        a, b = result.pair
        thresholds += (f"; shared: {cfg.shared_band[0]} <= r <= {cfg.shared_band[1]}, "
                       f"r = ||d_{b}|| / (||d_{a}|| + ||d_{b}||)")
    title = f"xc classify: {n} latents" + (f", {summary['n_tokens']} tokens" if summary["n_tokens"] else "")
    table = Table("class", "latents", "%", title=title, min_width=len(title) + 4)
    for name, count in sorted(summary["classes"].items()):
        table.add_row(name, str(count), f"{100 * count / n:.1f}")
    console_ = Console(file=file or sys.stderr, highlight=False)
    console_.print(table)
    console_.print(thresholds, soft_wrap=True)
    if "ls_verdicts" in summary:
        verdicts = Table("Latent Scaling verdict", "exclusive latents")
        for name, count in sorted(summary["ls_verdicts"].items()):
            verdicts.add_row(name, str(count))
        console_.print(verdicts)
        console_.print(f"artifact when nu_epsilon >= {cfg.nu_epsilon} (shrinkage) or nu_r >= {cfg.nu_r} "
                       "(decoupling)", soft_wrap=True)
