"""How good is a crosscoder? (`xc eval`)

    from xcli.analysis.evaluate import EvalConfig, evaluate
    report = evaluate(EvalConfig(checkpoint="xc.safetensors", stores=("acts.zarr",)))

On the store's held-out rows (the chunks `xc train` held out, found from the
checkpoint's eval fraction) or on all rows of a store:

    FVU_s          = sum_x ||x_s - x̂_s||^2 / sum_x ||x_s - mean_s||^2     per written source
    FVU_total      = the same sums over all written sources, in normalised units
    L0             = mean number of nonzero latents per token, with quantiles
    dead_fraction  = latents that never fire on these rows (BatchTopK uses its threshold)
    coherence      = mean functional coherence of the latents that fire, when the
                     crosscoder reads two or more layers (xcli.analysis.coherence; fmxcoders)

With models, the spliced-in next-token loss of each model (xcli.analysis.splice): CE clean,
with the reconstruction spliced in, with the activations zero-ablated, and

    CE score = (CE_ablate - CE_spliced) / (CE_ablate - CE_clean)
    KL score = (KL_ablate - KL_spliced) / KL_ablate

(SAELens' definitions). With a planted truth (`xc synth`): the mean
max cosine similarity of the planted features (MMCS), the fraction recovered
(cosine > 0.9), the same by kind and by layer span, and the reverse MMCS over
the latents that fire.
"""

import math

import numpy as np

from xcli import console, remote
from xcli.analysis.coherence import functional_coherence
from xcli.analysis.config import EvalConfig
from xcli.analysis.latent_stats import coherence_layers
from xcli.analysis.reconstruction import reconstruction
from xcli.crosscoder.model import Crosscoder, load
from xcli.data.loader import StoreSet, eval_batches
from xcli.devices import resolve_device
from xcli.errors import BadInput

# -- the scores -------------------------------------------------------------------------------------


# -- ground truth -------------------------------------------------------------------------------------

def truth_metrics(model: Crosscoder, truth, threshold: float = 0.9, fired: np.ndarray | None = None) -> dict:
    """Recovery of a planted dictionary: MMCS, fraction with cosine > threshold, both by kind and by
    layer span, and the reverse MMCS over latents that fire (all latents when `fired` is None)."""
    from xcli.data.synth import match

    found = match(truth, model)
    live = np.ones(model.n_latents, dtype=bool) if fired is None else np.asarray(fired, dtype=bool)

    def summary(rows: np.ndarray) -> dict:
        return {"features": int(rows.sum()), "mmcs": float(found.cosine[rows].mean()),
                "recovered": float((found.cosine[rows] > threshold).mean())}

    kinds = np.array(truth.kinds)
    lengths = truth.span_lengths()
    out = {"features": truth.n_features, "threshold": threshold, "mmcs": float(found.cosine.mean()),
           "recovered": found.recovered(threshold),
           "reverse_mmcs": float(found.reverse[live].mean()) if live.any() else None,
           "by_kind": {k: summary(kinds == k) for k in dict.fromkeys(truth.kinds)},
           "by_span": {str(n): summary(lengths == n) for n in sorted(set(lengths.tolist()))}}
    out["classification"] = classification_accuracy(model, truth, found.latent)
    return out


def planted_classes(model: Crosscoder, truth, config=None) -> list[str]:
    """The class `xc classify` would give each planted feature if a latent held exactly its planted
    directions: its rule applied to the planted decoder norms in the crosscoder's normalised units."""
    from xcli.analysis.classify import ClassifyConfig, assign_classes, model_groups, relative_norm

    config = config or ClassifyConfig()
    models = [g.model for g in model_groups(model)]
    scales = {name: float(model.scale(name)) for name in model.write}
    planted = truth.model_norms(scales)[:, [truth.model_names.index(m) for m in models]]
    shares = planted / planted.sum(1, keepdims=True)
    rel = relative_norm(planted[:, 0], planted[:, 1]) if len(models) == 2 else None
    return assign_classes(shares, models, np.zeros(truth.n_features, dtype=bool), config, rel)


def classification_accuracy(model: Crosscoder, truth, latents: np.ndarray) -> dict | None:
    """How often `xc classify` (decoder norms, default thresholds) gives the latent that best matches
    each planted feature the class of the planted feature; None for a one-model crosscoder."""
    from xcli.analysis.classify import classify

    result = classify(model)
    if len(result.models) < 2:
        return None
    if sorted(result.models) != sorted(truth.model_names):
        raise BadInput(f"the crosscoder's models {result.models} are not the truth's {truth.model_names}")
    expected = np.array(planted_classes(model, truth, result.config))
    learned = np.array([result.classes[i] for i in latents])
    kinds = np.array(truth.kinds)
    return {"accuracy": float((learned == expected).mean()),
            "by_kind": {k: float((learned == expected)[kinds == k].mean()) for k in dict.fromkeys(truth.kinds)},
            "expected": {c: int((expected == c).sum()) for c in dict.fromkeys(expected.tolist())},
            "thresholds": {"exclusive_share": result.config.exclusive_share,
                           "shared_band": list(result.config.shared_band)}}


# -- the command ----------------------------------------------------------------------------------------

def eval_rows(model: Crosscoder, stores: StoreSet, all_rows: bool) -> tuple[np.ndarray, str]:
    """The chunks to evaluate on: the checkpoint's held-out chunks of these stores, or all of them."""
    if all_rows:
        return np.arange(stores.n_chunks), "all"
    meta = getattr(model, "metadata", {}) or {}
    recorded = meta.get("store")
    fraction = (meta.get("hyperparameters") or {}).get("eval_fraction")
    if not recorded or fraction is None:
        raise BadInput("the checkpoint does not record the store it was trained on and its --eval-fraction, "
                       "so its held-out rows are unknown; pass --all-rows to evaluate on every row")
    if fraction <= 0:
        raise BadInput("the checkpoint was trained with --eval-fraction 0 and held out no rows; "
                       "pass --all-rows (on a store it was not trained on) instead")
    rows = {s.get("n_tokens") for s in recorded}
    digests = {s.get("tokens_sha256") for s in recorded}
    if rows != {stores.n_tokens} or digests != {stores.tokens_sha256}:
        raise BadInput(f"these stores ({stores.n_tokens} rows) are not the ones the checkpoint was trained on "
                       f"({', '.join(repr(s['path']) for s in recorded)}: {sorted(rows)} rows, other tokens), so "
                       f"they have no held-out rows; pass --all-rows to evaluate on every row")
    paths = {remote.resolved(s.path) for s in stores.stores}
    if paths != {s["path"] for s in recorded}:
        console.warn("the stores hold the same tokens as the training stores but live elsewhere; held-out rows "
                     "are the chunks training held out, assuming the same chunk size")
    _, held = stores.hold_out(fraction)
    return held, "held-out"


def check_sources(model: Crosscoder, stores: StoreSet) -> None:
    widths = {s.name: s.d for s in stores.sources}
    for source in model.sources:
        if source.name not in widths:
            raise BadInput(f"the checkpoint's source {source.name!r} is in none of the stores; they hold: "
                           f"{', '.join(widths)}")
        if widths[source.name] != source.d:
            raise BadInput(f"source {source.name!r} has width {widths[source.name]} in the store but "
                           f"{source.d} in the checkpoint")


def evaluate(cfg: EvalConfig) -> dict:
    """Everything `xc eval` prints, as one JSON-ready dict (NaN becomes None)."""

    device = resolve_device(cfg.device)
    model = load(cfg.checkpoint, device)
    stores = StoreSet(cfg.stores, allow_incomplete=cfg.allow_incomplete)
    check_sources(model, stores)
    truth = None
    if cfg.truth is not None:
        from xcli.data.synth import PlantedDictionary

        truth = PlantedDictionary.load(cfg.truth)
    chunks, which = eval_rows(model, stores, cfg.all_rows)
    console.info(f"evaluating on {which} rows: {len(chunks)} of {stores.n_chunks} chunks")
    result = reconstruction(model, stores, chunks, cfg.batch_size, device)
    report = {"checkpoint": str(cfg.checkpoint), "stores": [str(s.path) for s in stores.stores], "rows": which,
              **result.summary()}
    if coherence_layers(model) is not None:
        coherence = functional_coherence(model, eval_batches(stores, model.read, chunks, cfg.batch_size))
        report["coherence"] = {"mean": coherence.mean(), "layers": coherence.layers}
    if cfg.splice or cfg.models:
        from xcli.analysis.splice import SpliceConfig, spliced_loss
        from xcli.analysis.splice_aligned import aligned_spliced_loss

        measure = aligned_spliced_loss if any(s.alignment for s in stores.stores) else spliced_loss
        report["splice"] = measure(model, stores, chunks, SpliceConfig(
            models=cfg.models, data=cfg.data, windows=cfg.windows, window_batch=cfg.window_batch,
            device=str(device), dtype=cfg.dtype))
    if truth is not None:
        report["truth"] = truth_metrics(model, truth, cfg.threshold, result.fired)
    return json_ready(report)


def json_ready(value):
    """Floats that JSON can hold: NaN and infinities become None; numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
