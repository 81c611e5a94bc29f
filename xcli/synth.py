"""Synthetic activation stores with a planted dictionary, to check that training recovers it.

Each source s (think: one model, or one layer) holds token rows

    x_s = sum_g c_g u_g^s + noise,      c_g = Bernoulli(p_g) * Uniform(low, high)

where the coefficients c_g are shared by all sources (one "concept" fires in every
model at once) and u_g^s is feature g's direction in source s: a random unit
vector, or zero where the feature is absent. Features are *shared* (a direction in
every source) or *exclusive* to one source. This is the toy model of Sharkey et al.
(2022) extended to several sources (methods.md 5.4-5.5).

`make_store` writes an ordinary activation store plus the planted truth beside it
(`<store>.truth.safetensors`); `match` scores a trained crosscoder against the truth.
Everything is seeded: the same arguments give the same bytes.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from xcli.errors import BadInput
from xcli.files import atomic_path, check_output
from xcli.store import Source, StoreWriter, validate_source_names

TRUTH_FORMAT = "planted-dictionary"
BLOCK_ROWS = 4096  # rows generated per random stream; fixed so the data do not depend on chunk_rows


@dataclass(frozen=True)
class PlantedDictionary:
    """The ground truth of a synthetic store."""

    names: tuple[str, ...]
    """Source names, in store order."""
    kinds: tuple[str, ...]
    """Per feature: "shared", or "exclusive:<source>"."""
    decoders: dict[str, np.ndarray]
    """Per source, (G, d_s) feature directions in raw units: unit rows, zero where absent."""
    frequency: np.ndarray
    """(G,) probability that a feature fires on a token."""

    @property
    def n_features(self) -> int:
        return len(self.kinds)

    def save(self, path) -> Path:
        meta = {"format": TRUTH_FORMAT, "version": 1, "sources": list(self.names), "kinds": list(self.kinds)}
        tensors = {f"decoder.{n}": np.ascontiguousarray(self.decoders[n], dtype=np.float32) for n in self.names}
        tensors["frequency"] = self.frequency.astype(np.float64)
        with atomic_path(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp), metadata={"xc": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path) -> "PlantedDictionary":
        with safe_open(str(path), framework="np") as f:
            meta = json.loads(f.metadata()["xc"])
            decoders = {n: f.get_tensor(f"decoder.{n}") for n in meta["sources"]}
            frequency = f.get_tensor("frequency")
        return cls(tuple(meta["sources"]), tuple(meta["kinds"]), decoders, frequency)


def truth_path(store_path) -> Path:
    """Where `make_store` puts the planted truth of a store."""
    return Path(f"{store_path}.truth.safetensors")


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


def sample(truth: PlantedDictionary, rows: int, magnitude: tuple[float, float], noise: float,
           rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Coefficients (rows, G) and the activations of every source."""
    fires = rng.random((rows, truth.n_features)) < truth.frequency
    coefficients = fires * rng.uniform(magnitude[0], magnitude[1], (rows, truth.n_features))
    acts = {}
    for name in truth.names:
        x = coefficients @ truth.decoders[name]
        if noise:
            x += noise * rng.standard_normal(x.shape)
        acts[name] = x.astype(np.float32)
    return coefficients, acts


def make_store(path, *, n_tokens: int = 16384, sources=("a", "b"), d: int | dict[str, int] = 16,
               n_shared: int = 16, n_exclusive: int = 8, active: float = 3.0,
               magnitude: tuple[float, float] = (0.5, 1.5), noise: float = 0.0, decay: float = 1.0,
               seed: int = 0, chunk_rows: int = 1024, dtype: str = "float32", codec: str = "none",
               overwrite: bool = False) -> PlantedDictionary:
    """Write a synthetic activation store with a planted dictionary; return the truth.

    Args:
        path: the store folder to create; the truth goes to `truth_path(path)`.
        n_tokens: rows to write.
        sources: source names (at least one); each becomes Source(name, model=name, site="synthetic").
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
    truth = plant(names, widths, n_shared, n_exclusive, active, decay, np.random.default_rng([seed, 0]))
    store_sources = [Source(n, n, "synthetic", None, widths[n]) for n in names]
    meta = {"dataset": "synthetic", "synthetic": {
        "seed": seed, "n_shared": n_shared, "n_exclusive": n_exclusive, "active": active,
        "magnitude": list(magnitude), "noise": noise, "decay": decay, "truth": truth_path(path).name}}
    with atomic_path(path, overwrite) as tmp:
        writer = StoreWriter(tmp, store_sources, meta, dtype=dtype, chunk_rows=chunk_rows, codec=codec)
        for block, start in enumerate(range(0, n_tokens, BLOCK_ROWS)):
            rows = min(BLOCK_ROWS, n_tokens - start)
            coefficients, acts = sample(truth, rows, magnitude, noise, np.random.default_rng([seed, 1, block]))
            row = np.arange(start, start + rows)
            # Token id: 1 + the strongest feature of the row (0 when none fires), handy for dashboards.
            tokens = np.where(coefficients.max(axis=1) > 0, coefficients.argmax(axis=1) + 1, 0)
            writer.append(acts, tokens=tokens, sequence=row // 128, position=row % 128)
        writer.close(complete=True)
    truth.save(truth_path(path))
    return truth


@dataclass(frozen=True)
class FeatureMatch:
    """How well a crosscoder's latents match the planted features."""

    cosine: np.ndarray
    """(G,) best cosine between a planted feature and a latent's decoder (all sources concatenated)."""
    latent: np.ndarray
    """(G,) index of that best latent."""
    share: np.ndarray
    """(G, n_sources) that latent's decoder norm in each source over the sum (normalised units)."""

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
        raise BadInput(f"the crosscoder writes {model.write}, the truth has sources {list(truth.names)}")
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
    return FeatureMatch(cos[np.arange(len(best)), best], best, share)
