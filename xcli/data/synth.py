"""Synthetic activation stores with a planted dictionary: ground truth for crosscoders (`xc synth`).

Each source s (one layer of one "model") holds token rows

    x_s = sum_g c_g u_g^s + noise,      c_g = fires_g * Uniform(low, high)

The coefficients c_g are shared by all sources (one "concept" fires in every model
and layer at once) and u_g^s is feature g's direction in source s, zero where the
feature is absent. This is the toy model of Sharkey et al. (2022) extended to
several models and layers:

- kinds: *shared* (present in every model with norm 1), *exclusive* to one model,
  or *scaled* (present in every model, with norm `scale` in one of them);
- a shared feature's directions in two models are `model_angle` degrees apart;
- each feature spans a contiguous range of layers, and its direction turns by
  `drift` degrees per layer inside it (cosine cos(drift) between neighbours);
- firing probabilities are uniform, exponentially decaying or Zipf-like, scaled so
  that `active` features fire per token on average; with `correlation` > 0,
  features in groups of `group_size` fire together through a Gaussian copula
  (each feature keeps its own firing probability exactly);
- with `hierarchy` (P, C), P parent features each have C children: at most one child
  of a parent fires on a token, and the parent fires whenever a child does (and on its
  own too), the structure that feature absorption feeds on (Chanin et al. 2024).

`generate(spec, path)` writes an ordinary activation store plus the planted truth
beside it (`<store>.truth.safetensors`), on local disk or at a URL (s3://..., see
xcli.remote: the store is written in place and marked complete last, the truth is one
PUT after it); `match` scores a trained crosscoder against
the truth. `make_store` is the older two-source, one-layer form. Everything is
seeded: the same arguments give the same bytes.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save, save_file

from xcli import remote, strict_json
from xcli.data.config import SynthSpec, SynthStore, frequency_weights
from xcli.data.store import StoreWriter
from xcli.errors import BadInput
from xcli.files import atomic_path, check_output, check_replaceable, output_lock, remove
from xcli.source import Source, validate_source_names

TRUTH_FORMAT, TRUTH_VERSION = "planted-dictionary", 2
BLOCK_ROWS = 4096  # rows generated per random stream; fixed so the data do not depend on chunk_rows
SEQUENCE_ROWS = 128  # rows per pretend "sequence" in the token arrays


@dataclass(frozen=True)
class PlantedDictionary:
    """The ground truth of a synthetic store."""

    names: tuple[str, ...]
    """Source names, in store order."""
    kinds: tuple[str, ...]
    """Per feature: "shared", "exclusive:<model>" or "scaled:<model>" (its norm is `scale` there)."""
    decoders: dict[str, np.ndarray]
    """Per source, (G, d_s) feature directions in raw units: norm 1 (or the scale), zero where absent."""
    frequency: np.ndarray
    """(G,) probability that a feature fires on a token."""
    models: tuple[str, ...] | None = None
    """Per source, the model it belongs to (default: the source name)."""
    layers: tuple[int | None, ...] | None = None
    """Per source, its layer (default: None)."""
    spans: np.ndarray | None = None
    """(G, 2) first and last layer of each feature, or None for one-layer truths."""
    triggers: np.ndarray | None = None
    """(G,) the feature whose firing each feature's firing requires (-1: none), or None: no triggers."""
    trigger: float = 0.0
    """How often a triggered feature fires when its trigger fires."""
    parents: np.ndarray | None = None
    """(G,) each feature's parent (-1: none), or None: no hierarchy. A parent fires whenever one of its
    children does; a parent's children never fire together; `frequency` counts every firing."""

    @property
    def n_features(self) -> int:
        return len(self.kinds)

    @property
    def source_models(self) -> tuple[str, ...]:
        return self.models or self.names

    @property
    def model_names(self) -> list[str]:
        """Models in order of first appearance."""
        return list(dict.fromkeys(self.source_models))

    def span_lengths(self) -> np.ndarray:
        """(G,) number of layers each feature spans (1 without spans)."""
        if self.spans is None:
            return np.ones(self.n_features, dtype=np.int64)
        return self.spans[:, 1] - self.spans[:, 0] + 1

    def model_norms(self, scales: dict[str, float] | None = None) -> np.ndarray:
        """(G, n_models) norm of each feature's directions over the sources of each model,
        concatenated; with `scales` (source -> input scale) in a crosscoder's normalised units."""
        scales = scales or {}
        out = np.zeros((self.n_features, len(self.model_names)))
        for name, model in zip(self.names, self.source_models):
            rows = self.decoders[name].astype(np.float64) * scales.get(name, 1.0)
            out[:, self.model_names.index(model)] += (rows ** 2).sum(1)
        return np.sqrt(out)

    def save(self, path) -> Path:
        meta = {"format": TRUTH_FORMAT, "version": TRUTH_VERSION, "sources": list(self.names),
                "kinds": list(self.kinds), "models": list(self.source_models),
                "layers": list(self.layers) if self.layers else [None] * len(self.names)}
        tensors = {f"decoder.{n}": np.ascontiguousarray(self.decoders[n], dtype=np.float32) for n in self.names}
        tensors["frequency"] = self.frequency.astype(np.float64)
        if self.spans is not None:
            tensors["spans"] = np.ascontiguousarray(self.spans, dtype=np.int64)
        if self.triggers is not None:
            tensors["triggers"] = np.ascontiguousarray(self.triggers, dtype=np.int64)
            meta["trigger"] = self.trigger
        if self.parents is not None:
            tensors["parents"] = np.ascontiguousarray(self.parents, dtype=np.int64)
        metadata = {"xc": strict_json.dumps(meta)}
        if remote.is_url(path):  # one PUT: the object is whole or absent
            url = remote.location(path)
            url.fs().pipe_file(url.key, save(tensors, metadata=metadata))
            return url
        with atomic_path(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path) -> "PlantedDictionary":
        if remote.is_url(path):  # a small file: read once, opened from a local copy
            import tempfile

            url = remote.location(path)
            if not url.exists():
                raise BadInput(f"truth file {str(url)!r} does not exist (xc synth writes it as "
                               "<store>.truth.safetensors)")
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as local:
                local.write(url.fs().cat_file(url.key))
                local.flush()
                return cls._load(local.name, str(url))
        return cls._load(path, str(path))

    @classmethod
    def _load(cls, path, shown: str) -> "PlantedDictionary":
        path = Path(path)
        if not path.is_file():
            raise BadInput(f"truth file {shown!r} does not exist (xc synth writes it as <store>.truth.safetensors)")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = json.loads((f.metadata() or {})["xc"])
                decoders = {n: f.get_tensor(f"decoder.{n}") for n in meta["sources"]}
                frequency = f.get_tensor("frequency")
                spans = f.get_tensor("spans") if "spans" in f.keys() else None
                triggers = f.get_tensor("triggers") if "triggers" in f.keys() else None
                parents = f.get_tensor("parents") if "parents" in f.keys() else None
        except Exception as e:
            raise BadInput(f"{shown!r} is not a planted-dictionary truth file ({type(e).__name__})") from e
        if meta.get("format") != TRUTH_FORMAT or int(meta.get("version", 0)) > TRUTH_VERSION:
            raise BadInput(f"{shown!r} has format {meta.get('format')!r} version {meta.get('version')!r}; "
                           f"this xc reads {TRUTH_FORMAT!r} up to version {TRUTH_VERSION}")
        layers = meta.get("layers")
        return cls(tuple(meta["sources"]), tuple(meta["kinds"]), decoders, frequency,
                   tuple(meta["models"]) if meta.get("models") else None,
                   tuple(layers) if layers else None, spans, triggers, float(meta.get("trigger", 0.0)),
                   check_parents(parents, len(meta["kinds"]), path))

    def children(self) -> dict[int, np.ndarray]:
        """Each parent feature and its children, in feature order."""
        if self.parents is None:
            return {}
        return {int(p): np.flatnonzero(self.parents == p) for p in np.unique(self.parents[self.parents >= 0])}


def check_parents(parents, n_features: int, path) -> np.ndarray | None:
    """A truth file's parents: one per feature, -1 or another feature that has no parent itself."""
    if parents is None:
        return None
    bad = (parents.shape != (n_features,) or not np.issubdtype(parents.dtype, np.integer)
           or ((parents < -1) | (parents >= n_features)).any())
    if not bad:
        has = parents >= 0
        bad = bool((parents[parents[has]] != -1).any() or (parents[has] == np.flatnonzero(has)).any())
    if bad:
        raise BadInput(f"truth file {str(path)!r}: tensor parents is not one parent (-1 or a feature without a "
                       f"parent) per feature")
    return parents


def truth_path(store_path):
    """Where the planted truth of a synthetic store lives: a Path, or a UrlPath beside a store at a URL."""
    if remote.is_url(store_path):
        return remote.location(f"{store_path}.truth.safetensors")
    return Path(f"{store_path}.truth.safetensors")


# -- the general generator ----------------------------------------------------------------------

PRESETS = {
    # Two models, one layer: shared, exclusive and scale-changed features (model diffing).
    "diff": SynthSpec(models=("a", "b"), width=32, shared=48, exclusive=16, scaled=8, scale=0.3, active=4.0),
    # One model, six layers: features spanning 1-6 layers, turning 15 degrees per layer.
    "layers": SynthSpec(models=("m",), layers=6, width=24, shared=96, exclusive=0, span=(1, 6), drift=15.0,
                        active=4.0),
    # Two models of four layers: diffing and depth at once, with correlated, Zipf-like firing.
    "diff-layers": SynthSpec(models=("a", "b"), layers=4, width=24, shared=48, exclusive=12, span=(1, 4),
                             drift=10.0, model_angle=10.0, active=4.0, frequencies="zipf:0.5",
                             correlation=0.3),
}


def load_spec(spec: str | None, **overrides) -> SynthSpec:
    """A preset name or a JSON file of SynthSpec fields (or None: the defaults), with overrides
    (None values are ignored)."""
    fields = {f.name for f in dataclasses.fields(SynthSpec)}
    if spec is None:
        base = {}
    elif spec in PRESETS:
        base = PRESETS[spec].to_json()
    elif Path(spec).is_file():
        try:
            base = json.loads(Path(spec).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"spec {spec!r} is not a JSON file ({e})") from None
        if not isinstance(base, dict):
            raise BadInput(f"spec {spec!r} must hold a JSON object of fields")
        unknown = sorted(set(base) - fields)
        if unknown:
            raise BadInput(f"spec {spec!r} has unknown field {unknown[0]!r}; fields are: {', '.join(sorted(fields))}")
    else:
        raise BadInput(f"spec {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    base.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("models", "magnitude", "span"):
        if isinstance(base.get(key), list):
            base[key] = tuple(base[key])
    try:
        return SynthSpec(**base)
    except TypeError as e:
        raise BadInput(f"spec {spec!r} has a field of the wrong type ({e})") from None


def plant_spec(spec: SynthSpec, rng: np.random.Generator) -> PlantedDictionary:
    """Draw kinds, layer spans, directions and firing probabilities for `spec`."""
    models, G, L = spec.models, spec.n_features, spec.layers
    kinds = (["shared"] * spec.shared + [f"exclusive:{m}" for m in models for _ in range(spec.exclusive)]
             + [f"scaled:{m}" for m in models for _ in range(spec.scaled)])
    amplitude = np.zeros((G, len(models)))  # norm of each feature in each model
    for g, kind in enumerate(kinds):
        label, _, owner = kind.partition(":")
        if label == "exclusive":
            amplitude[g, models.index(owner)] = 1.0
        else:
            amplitude[g] = 1.0
            if label == "scaled":
                amplitude[g, models.index(owner)] = spec.scale
    # Per feature, orthonormal vectors: a common direction u, one offset per model, one drift direction.
    basis, _ = np.linalg.qr(rng.standard_normal((G, spec.width, min(spec.width, len(models) + 2))))
    u, offsets = basis[:, :, 0], basis[:, :, 1:len(models) + 1]
    drift_dir = basis[:, :, -1] if basis.shape[2] == len(models) + 2 else np.zeros_like(u)
    # At angle a from u, with orthonormal offsets, two models' directions have cosine cos(a)^2.
    a = math.acos(math.sqrt(math.cos(math.radians(spec.model_angle))))
    lengths = rng.integers(spec.span[0], spec.span[1] + 1, G)
    starts = rng.integers(0, L - lengths + 1)
    spans = np.stack([starts, starts + lengths - 1], axis=1)
    names, decoders, source_models, source_layers = [], {}, [], []
    delta = math.radians(spec.drift)
    for k, m in enumerate(models):
        base = math.cos(a) * u + math.sin(a) * offsets[:, :, k] if spec.model_angle else u
        for layer in range(L):
            steps = np.clip(layer - starts, 0, None)[:, None]
            direction = np.cos(delta * steps) * base + np.sin(delta * steps) * drift_dir
            inside = (spans[:, 0] <= layer) & (layer <= spans[:, 1])
            name = f"{m}.synthetic.{layer}"
            names.append(name)
            decoders[name] = direction * (amplitude[:, k] * inside)[:, None]
            source_models.append(m)
            source_layers.append(layer)
    weights = rng.permutation(frequency_weights(spec.frequencies, G))
    frequency = weights / weights.sum() * spec.active
    parents = None
    if spec.hierarchy:  # parent t*(1+C), then its C children; the parent also fires when a child does
        n_parents, n_children = spec.hierarchy
        parents = np.full(G, -1, dtype=np.int64)
        for t in range(n_parents):
            root = t * (1 + n_children)
            kids = slice(root + 1, root + 1 + n_children)
            parents[kids] = root
            either = frequency[kids].sum()
            if either > 1:
                raise BadInput(f"--hierarchy {n_parents},{n_children}: the children of a parent would fire on "
                               f"{either:.3g} of the tokens, above 1 (they are mutually exclusive); lower --active "
                               f"or the number of children")
            frequency[root] = either + (1 - either) * frequency[root]
    triggers = None
    if spec.trigger:  # the i-th exclusive feature (over all models) fires with shared feature i mod shared
        triggers = np.full(G, -1, dtype=np.int64)
        exclusive = [g for g, kind in enumerate(kinds) if kind.startswith("exclusive:")]
        for i, g in enumerate(exclusive):
            triggers[g] = i % spec.shared
            frequency[g] = spec.trigger * frequency[triggers[g]]
    return PlantedDictionary(tuple(names), tuple(kinds), decoders, frequency, tuple(source_models),
                             tuple(source_layers), spans if L > 1 else None, triggers, spec.trigger, parents)


def generate(spec: SynthSpec, path, *, chunk_rows: int = SynthStore.chunk_rows, dtype: str = SynthStore.dtype,
             codec: str = SynthStore.codec, overwrite: bool = SynthStore.overwrite,
             storage_options: tuple = ()) -> PlantedDictionary:
    """Write the store `path` (a folder or a URL) for `spec` and its truth beside it (`truth_path(path)`);
    return the truth."""
    remote.configure(storage_options)
    if chunk_rows < 1:
        raise BadInput(f"--chunk-rows {chunk_rows} must be at least 1")
    with output_lock(path):
        path = check_output(path, overwrite)
        check_output(truth_path(path), overwrite)
        if overwrite:  # replace only a store and truth that xc wrote
            check_replaceable(path, "store")
            check_replaceable(truth_path(path), "truth")
        truth = plant_spec(spec, np.random.default_rng([spec.seed, 0]))
        sources = [Source(n, m, "synthetic", layer, spec.width)
                   for n, m, layer in zip(truth.names, truth.source_models, truth.layers)]
        groups = np.random.default_rng([spec.seed, 2]).permutation(spec.n_features) // spec.group_size
        meta = {"dataset": "synthetic", "synthetic": {**spec.to_json(), "truth": truth_path(path).name}}
        write_store(path, truth, sources, meta, spec.tokens, spec.seed, spec.magnitude, spec.noise,
                    spec.correlation, groups, chunk_rows, dtype, codec, overwrite)
    return truth


# -- sampling and writing ------------------------------------------------------------------------

def sample(truth: PlantedDictionary, rows: int, magnitude: tuple[float, float], noise: float,
           rng: np.random.Generator, correlation: float = 0.0,
           groups: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Coefficients (rows, G) and the activations of every source.

    With correlation rho > 0, feature g fires when z_g < Phi^-1(p_g), where
    z_g = sqrt(rho) y_group(g) + sqrt(1 - rho) e_g with y, e standard normal: a Gaussian
    copula, so that each feature still fires with probability p_g.
    """
    G = truth.n_features
    if correlation > 0:
        shared = rng.standard_normal((rows, int(groups.max()) + 1))[:, groups]
        z = math.sqrt(correlation) * shared + math.sqrt(1 - correlation) * rng.standard_normal((rows, G))
        normal = NormalDist()
        cut = np.array([normal.inv_cdf(p) if 0 < p < 1 else (math.inf if p >= 1 else -math.inf)
                        for p in truth.frequency])
        fires = z < cut
    else:
        fires = rng.random((rows, G)) < truth.frequency
    if truth.parents is not None:
        fire_hierarchy(fires, truth, rng)
    if truth.triggers is not None:  # a triggered feature fires on a `trigger` fraction of its trigger's firings
        tied = np.flatnonzero(truth.triggers >= 0)
        fires[:, tied] = fires[:, truth.triggers[tied]] & (rng.random((rows, len(tied))) < truth.trigger)
    coefficients = fires * rng.uniform(magnitude[0], magnitude[1], (rows, G))
    acts = {}
    for name in truth.names:
        x = coefficients @ truth.decoders[name]
        if noise:
            x += noise * rng.standard_normal(x.shape)
        acts[name] = x.astype(np.float32)
    return coefficients, acts


def fire_hierarchy(fires: np.ndarray, truth: PlantedDictionary, rng: np.random.Generator) -> None:
    """Redraw the firings of every parent and child in `fires` (rows, G), in place: per parent, one
    uniform u per row picks at most one child (child j when u falls in its share of the cumulative
    frequencies), and the parent fires when a child does or, otherwise, with its own probability
    (frequency - s) / (1 - s), s the children's summed frequency, so that it fires with `frequency`."""
    trees = truth.children()
    rows = len(fires)
    u, own = rng.random((rows, len(trees))), rng.random((rows, len(trees)))
    for t, (parent, kids) in enumerate(trees.items()):
        bounds = np.cumsum(truth.frequency[kids])
        pick = np.searchsorted(bounds, u[:, t], side="right")  # len(kids): no child
        fires[:, kids] = pick[:, None] == np.arange(len(kids))
        either = bounds[-1]
        alone = (truth.frequency[parent] - either) / (1 - either) if either < 1 else 0.0
        fires[:, parent] = (pick < len(kids)) | (own[:, t] < alone)


def write_store(path, truth: PlantedDictionary, sources: list[Source], meta: dict, n_tokens: int, seed: int,
                magnitude, noise: float, correlation: float, groups, chunk_rows: int, dtype: str, codec: str,
                overwrite: bool) -> None:
    """Sample `n_tokens` rows block by block and write the store, then the truth.

    A local store is written under a temp name and renamed. An object store has no rename: the store
    is written in place, complete only once its last attribute write marks it so (readers refuse it
    before), and the truth follows as one PUT; a killed run leaves an incomplete store and no truth,
    which --overwrite replaces."""
    if remote.is_url(path):
        if overwrite:
            remove(truth_path(path))  # first: a truth beside a store being rewritten would be stale
            remove(path)
        _write_rows(path, truth, sources, meta, n_tokens, seed, magnitude, noise, correlation, groups, chunk_rows,
                    dtype, codec)
    else:
        with atomic_path(path, overwrite) as tmp:
            _write_rows(tmp, truth, sources, meta, n_tokens, seed, magnitude, noise, correlation, groups,
                        chunk_rows, dtype, codec)
    truth.save(truth_path(path))


def _write_rows(path, truth: PlantedDictionary, sources, meta, n_tokens, seed, magnitude, noise, correlation, groups,
                chunk_rows, dtype, codec) -> None:
    writer = StoreWriter(path, sources, meta, dtype=dtype, chunk_rows=chunk_rows, codec=codec)
    for block, start in enumerate(range(0, n_tokens, BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, n_tokens - start)
        coefficients, acts = sample(truth, rows, magnitude, noise, np.random.default_rng([seed, 1, block]),
                                    correlation, groups)
        row = np.arange(start, start + rows)
        # Token id: 1 + the strongest feature of the row (0 when none fires), handy for dashboards.
        tokens = np.where(coefficients.max(axis=1) > 0, coefficients.argmax(axis=1) + 1, 0)
        writer.append(acts, tokens=tokens, sequence=row // SEQUENCE_ROWS, position=row % SEQUENCE_ROWS)
    writer.close(complete=True)


# -- the original two-source form ------------------------------------------------------------------

def plant(names, d: dict[str, int], n_shared: int, n_exclusive: int, active: float, decay: float,
          rng: np.random.Generator) -> PlantedDictionary:
    """Draw feature directions and firing probabilities (shared features first)."""
    kinds = ["shared"] * n_shared + [f"exclusive:{n}" for n in names for _ in range(n_exclusive)]
    decoders = {}
    for name in names:
        u = rng.standard_normal((len(kinds), d[name]))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        present = np.array([k in ("shared", f"exclusive:{name}") for k in kinds])
        decoders[name] = u * present[:, None]
    # p_g proportional to decay**g (decay 1: all equally frequent), summing to `active`.
    weights = decay ** np.arange(len(kinds), dtype=np.float64)
    frequency = np.minimum(weights / weights.sum() * active, 1.0)
    return PlantedDictionary(tuple(names), tuple(kinds), decoders, frequency)


def make_store(path, *, n_tokens: int = 16384, sources=("a", "b"), d: int | dict[str, int] = 16,
               n_shared: int = 16, n_exclusive: int = 8, active: float = 3.0,
               magnitude: tuple[float, float] = (0.5, 1.5), noise: float = 0.0, decay: float = 1.0,
               seed: int = 0, chunk_rows: int = 1024, dtype: str = "float32", codec: str = "none",
               overwrite: bool = False) -> PlantedDictionary:
    """Write a synthetic store with one layer per source and independent directions per source.

    Each source is its own model (Source(name, model=name, site="synthetic")).

    Args:
        path: the store folder to create; the truth goes to `truth_path(path)`.
        n_tokens: rows to write.
        sources: source names (at least one).
        d: width of every source, or a dict name -> width.
        n_shared: features with a direction in every source.
        n_exclusive: features exclusive to each source (per source).
        active: expected number of features firing per token.
        magnitude: (low, high) of the uniform coefficient of a firing feature.
        noise: standard deviation of Gaussian noise added to every coordinate.
        decay: firing probability of feature g is proportional to decay**g (1 = uniform).
        seed: everything random derives from it.
    """
    names = list(sources)
    widths = {n: int(d[n] if isinstance(d, dict) else d) for n in names}
    if not names:
        raise BadInput("a synthetic store needs at least one source")
    validate_source_names([Source(n, n, "synthetic", None, 1) for n in names])
    if min(widths.values()) < 1 or n_tokens < 1 or chunk_rows < 1:
        raise BadInput("source widths, n_tokens and chunk_rows must be positive")
    if n_shared < 0 or n_exclusive < 0 or n_shared + n_exclusive == 0:
        raise BadInput(f"need at least one feature; got n_shared={n_shared}, n_exclusive={n_exclusive}")
    if not 0 < active <= n_shared + len(names) * n_exclusive:
        raise BadInput(f"active={active} must be positive and at most the number of features")
    if not 0 <= magnitude[0] <= magnitude[1] or magnitude[1] <= 0:
        raise BadInput(f"magnitude={magnitude} must be 0 <= low <= high with high > 0")
    if noise < 0 or not 0 < decay <= 1:
        raise BadInput(f"noise={noise} must be >= 0 and decay={decay} in (0, 1]")
    path = check_output(path, overwrite)
    if overwrite:
        check_replaceable(path, "store")
        check_replaceable(truth_path(path), "truth")
    truth = plant(names, widths, n_shared, n_exclusive, active, decay, np.random.default_rng([seed, 0]))
    store_sources = [Source(n, n, "synthetic", None, widths[n]) for n in names]
    meta = {"dataset": "synthetic", "synthetic": {
        "seed": seed, "n_shared": n_shared, "n_exclusive": n_exclusive, "active": active,
        "magnitude": list(magnitude), "noise": noise, "decay": decay, "truth": truth_path(path).name}}
    write_store(path, truth, store_sources, meta, n_tokens, seed, magnitude, noise, 0.0, None, chunk_rows,
                dtype, codec, overwrite)
    return truth


# -- scoring a crosscoder against the truth --------------------------------------------------------

@dataclass(frozen=True)
class FeatureMatch:
    """How well a crosscoder's latents match the planted features."""

    cosine: np.ndarray
    """(G,) best cosine between a planted feature and a latent's decoder (all sources concatenated)."""
    latent: np.ndarray
    """(G,) index of that best latent."""
    share: np.ndarray
    """(G, n_sources) that latent's decoder norm in each source over the sum (normalised units)."""
    reverse: np.ndarray | None = None
    """(F,) best cosine between each latent's decoder and a planted feature."""

    def recovered(self, threshold: float = 0.9) -> float:
        """Fraction of planted features with a latent of cosine above `threshold`."""
        return float((self.cosine > threshold).mean())


def match(truth: PlantedDictionary, model) -> FeatureMatch:
    """Compare a Crosscoder's decoders with the planted directions.

    Cosines use decoders in raw units (the model's normalised decoders divided by each
    source's input scale), so they compare with the raw planted directions; shares use
    normalised units, as classification does.
    """
    if set(model.write) != set(truth.names):
        raise BadInput(f"the crosscoder writes {model.write}, the truth has sources {list(truth.names)}; "
                       f"compare a crosscoder that writes every source of the synthetic store")
    with torch.no_grad():
        raw = np.concatenate([(model.decoder_weight(n) / model.scale(n)).float().cpu().numpy()
                              for n in truth.names], axis=1)
        norms = np.stack([model.decoder_weight(n).norm(dim=1).float().cpu().numpy() for n in truth.names], axis=1)
    planted = np.concatenate([truth.decoders[n] for n in truth.names], axis=1)
    planted = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    learned = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    cos = planted @ learned.T  # (G, F)
    best = cos.argmax(axis=1)
    share = norms[best] / np.maximum(norms[best].sum(axis=1, keepdims=True), 1e-12)
    return FeatureMatch(cos[np.arange(len(best)), best], best, share, cos.max(axis=0))
