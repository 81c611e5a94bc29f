"""A planted chain of three releases on a synthetic store (built once per test session by conftest.py).

v1, v2 and v3 share 8 "grammar" features (same directions, same norms in every release);
each release also has 2 features of its own: v2's are the behaviour that version 2 adds
and version 3 removes. Crosscoders: (v1, v2), (v2, v3), (v2, v3) again with another
seed, and one over (v1, v2, v3) at once. About 30 s on one CPU core.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xcli.data.config import SynthSpec
from xcli.data.synth import PlantedDictionary

SPEC = SynthSpec(models=("v1", "v2", "v3"), width=12, shared=8, exclusive=2, active=2.0, tokens=8192, seed=0)
TRAIN = {"arch": "topk", "latents": 32, "k": 2, "batch_size": 256, "tokens": 12 * 8192, "lr": 5e-3,
         "dead_tokens": 2000, "shuffle_buffer": 2048, "eval_fraction": 0.125, "device": "cpu", "log_every": 10 ** 6,
         "checkpoint_every": 10 ** 6}


@dataclass
class Chain:
    folder: Path
    store: Path
    truth: PlantedDictionary
    crosscoders: dict[str, Path]  # "v1v2", "v2v3", "v2v3_seed1"

    def source(self, release: str) -> str:
        return f"{release}.synthetic.0"


def train_pair(store: Path, output: Path, a: str, b: str, seed: int, *more: str) -> Path:
    """A crosscoder over releases a, b (and `more`)."""
    from xcli.train import TrainConfig, train

    sources = tuple(f"{r}.synthetic.0" for r in (a, b, *more))
    return train(TrainConfig(stores=(str(store),), output=str(output), sources=sources, seed=seed, **TRAIN))


def best_latents(chain: Chain, checkpoint: Path, releases: tuple[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """Per planted feature, the latent whose decoder (raw units, both releases) is closest, and the cosine."""
    import torch

    from xcli.crosscoder.model import load

    model = load(checkpoint)
    names = [chain.source(r) for r in releases]
    with torch.no_grad():
        learned = np.concatenate([(model.decoder_weight(n) / model.scale(n)).numpy() for n in names], 1)
    planted = np.concatenate([chain.truth.decoders[n] for n in names], 1)
    cos = (planted / np.maximum(np.linalg.norm(planted, axis=1, keepdims=True), 1e-12)) @ \
        (learned / np.maximum(np.linalg.norm(learned, axis=1, keepdims=True), 1e-12)).T
    return cos.argmax(1), cos.max(1)
