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
  dedicated:<m>  a latent of a --exclusive block of model m (xcli.crosscoder.partition): its
                 decoder for the other models is zero by construction. Its activity (with a
                 store) and Latent Scaling say whether it is really used. Every latent of a
                 partitioned crosscoder also reports its "block": tied, dedicated:<m> or free.
  shared         two models: shared_band[0] <= r <= shared_band[1] [0.3, 0.7]; more models:
                 every model holds at least 2 * shared_band[0] / n_models of the norm
  mixed          anything else

With a store, one pass over it (xcli.analysis.latent_stats, which defines the formulas) adds
activation frequency, mean and max activation, Latent Scaling and, for cross-layer
crosscoders, functional coherence.

Latent Scaling verdict, for exclusive latents of the pair A, B (Minder et al. 2025;
thresholds of the paper's figures): "specific" when nu_epsilon < 0.2 and nu_r < 0.5.
Otherwise the exclusivity is a sparsity artifact: "shrinkage" (nu_epsilon high: the
other model carries the direction in its reconstruction error, its decoder was shrunk
to zero: Complete Shrinkage), "decoupling" (nu_r high: other latents rebuild the
direction in the other model: Latent Decoupling), or "shrinkage+decoupling".
"undetermined" when the latent never fires or an owner beta is below 1e-3 (the latent
does not explain its own model's activations, and the ratios are noise).

Cross-layer profile: written sources are pooled by layer (L2 over the sources of a
layer), layer_share[l] = norm_l / sum_l norm_l, peak_layer = argmax, span_layers =
layers with share >= span_share [0.1].
"""

import csv
import io
import math
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from xcli import strict_json
from xcli.analysis.config import ROW_FORMATS, ClassifyConfig
from xcli.analysis.latent_stats import scan_store
from xcli.crosscoder.model import Crosscoder
from xcli.data.store import ActivationStore
from xcli.devices import resolve_device
from xcli.errors import BadInput
from xcli.source import Source

DEAD_NORM = 1e-8  # a latent whose decoder rows sum to less than this writes nothing
# Latent Scaling ratios divide by the owner's betas (about 1 for a latent that reconstructs
# its own model); below this they are noise and the verdict is "undetermined".
MIN_OWNER_BETA = 1e-3


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


def decoder_cosine(model: Crosscoder, pairs: list[tuple[Source, Source]]) -> np.ndarray:
    """cosine(d_A, d_B) per latent over corresponding sources, accumulated in float64 without copies."""
    dot = torch.zeros(model.n_latents, dtype=torch.float64)
    sq_a, sq_b = torch.zeros_like(dot), torch.zeros_like(dot)
    with torch.no_grad():
        for s, t in pairs:
            a, b = model.decoder_weight(s.name).detach().cpu(), model.decoder_weight(t.name).detach().cpu()
            dot += (a * b).sum(1, dtype=torch.float64)
            sq_a += (a * a).sum(1, dtype=torch.float64)
            sq_b += (b * b).sum(1, dtype=torch.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (dot / (sq_a * sq_b).sqrt()).numpy()


def assign_classes(shares: np.ndarray, models: list[str], dead: np.ndarray, config: ClassifyConfig,
                   rel_norm: np.ndarray | None = None) -> list[str]:
    """Class of each latent from its norm shares (F, n_models); see the module docstring.

    With two models, pass r (B over A): the shared band applies to it.
    """
    low, high = config.shared_band
    n = len(models)
    finite = np.all(np.isfinite(shares), axis=1)
    safe = np.where(finite[:, None], shares, 0.0)
    if n == 2 and rel_norm is not None:
        shared = (low <= rel_norm) & (rel_norm <= high)
    else:
        shared = safe.min(1) >= 2 * low / n if n > 2 else np.zeros(len(shares), dtype=bool)
    labels = np.array([f"exclusive:{m}" for m in models] + ["shared", "mixed", "dead"], dtype=object)
    index = np.select([dead | ~finite, safe.max(1) >= config.exclusive_share, shared],
                      [n + 2, safe.argmax(1), n], default=n + 1)
    return labels[index].tolist()


def scaling_verdict(nu_eps: float, nu_r: float, beta_owner_err: float, beta_owner_rec: float,
                    fires: bool, config: ClassifyConfig) -> str:
    if not fires or not (beta_owner_err > MIN_OWNER_BETA and beta_owner_rec > MIN_OWNER_BETA):
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
    roles: list[str | None] | None = None  # per latent: "tied", "dedicated:MODEL" or None, from the partition

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
            if self.roles is not None:
                row["block"] = self.roles[i] or "free"
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
                                                         if k not in ("device", "batch_elements", "max_tokens", "storage_options")}}
        if self.scaling is not None:
            verdicts: dict[str, int] = {}
            for c, v in zip(self.classes, self.scaling["verdict"]):
                if c.startswith(("exclusive:", "dedicated:")):
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
        source_norm = torch.stack([torch.linalg.vector_norm(model.decoder_weight(n).detach().cpu(), dim=1,
                                                            dtype=torch.float64) for n in model.write], 1).numpy()
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
            result.cosine = decoder_cosine(model, matched)
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
        scan = scan_store(model, store, matched, max_tokens=config.max_tokens,
                          batch_elements=config.batch_elements, device=resolve_device(config.device))
        result.n_tokens, result.activity = scan["n_tokens"], scan["activity"]
        result.scaling, result.coherence = scan.get("scaling"), scan.get("coherence")
        dead = dead | (result.activity["frequency"] <= config.dead_frequency)

    rel = result.rel_norm if len(groups) == 2 else None  # the band applies to r as printed (B over A)
    result.classes = assign_classes(share, result.models, dead, config, rel)
    if model.partition is not None:  # a dedicated latent is exclusive by construction: say so, unless dead
        result.roles = model.partition.latent_roles(model.n_latents)
        result.classes = [role if role and role.startswith("dedicated:") and c != "dead" else c
                          for c, role in zip(result.classes, result.roles)]
    if result.scaling is not None:
        s = result.scaling
        fires = result.activity["frequency"] > 0
        s["verdict"] = [
            scaling_verdict(s["nu_epsilon"][i], s["nu_r"][i], s["beta_error"][i, s["owner"][i]],
                            s["beta_reconstruction"][i, s["owner"][i]], bool(fires[i]), config)
            if result.classes[i].startswith(("exclusive:", "dedicated:")) else None
            for i in range(result.n_latents)
        ]
    return result


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
    if fmt not in ROW_FORMATS:
        raise BadInput(f"--format {fmt!r} is not known; use one of {', '.join(ROW_FORMATS)}")
    if fmt == "jsonl":
        for row in result.rows():
            out.write(strict_json.dumps(row) + "\n")
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
    table = Table("class", "latents", "%")
    for name, count in sorted(summary["classes"].items()):
        table.add_row(name, str(count), f"{100 * count / n:.1f}")
    console_ = Console(file=file or sys.stderr, highlight=False)
    console_.print(title)
    console_.print(table)
    console_.print(thresholds, soft_wrap=True)
    if "ls_verdicts" in summary:
        verdicts = Table("Latent Scaling verdict", "exclusive latents")
        for name, count in sorted(summary["ls_verdicts"].items()):
            verdicts.add_row(name, str(count))
        console_.print(verdicts)
        console_.print(f"artifact when nu_epsilon >= {cfg.nu_epsilon} (shrinkage) or nu_r >= {cfg.nu_r} "
                       "(decoupling)", soft_wrap=True)
