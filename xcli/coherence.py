"""Functional coherence: how many layers drive each latent (fmxcoders; methods.md section 3).

For each layer l, zero the encoder input of layer l, encode again, and measure the
relative change of every latent j over a set of tokens x:

    delta_l[j] = sum_x |f_j(x) - f_j^(-l)(x)| / (sum_x f_j(x) + 1e-8)
    C_j        = sum_l delta_l[j] / max_l delta_l[j]

C_j runs from 1 (one layer drives the latent) to L (all layers drive it equally); it
is NaN for a latent that never fires or never changes. The paper gives the ablation
and the epsilon; this aggregate (an "effective number of layers") follows the
adaptation in methods.md, since the paper's exact formula was not recovered.

Latents are encoded as consumers see them: eval mode, BatchTopK with its threshold.
A "layer" is every read source with that layer number (in a crosscoder over two
models, both models' layer l are zeroed together); when the sources carry no layer
numbers, or only one, each read source is its own group.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from xcli.crosscoder import Crosscoder

EPSILON = 1e-8


def layer_groups(model: Crosscoder) -> dict[str, list[str]]:
    """Label -> the read sources zeroed together (by layer number, else one source each)."""
    by_name = {s.name: s for s in model.sources}
    layers = [by_name[n].layer for n in model.read]
    if None in layers or len(set(layers)) < 2:
        return {n: [n] for n in model.read}
    return {str(layer): [n for n in model.read if by_name[n].layer == layer] for layer in sorted(set(layers))}


@dataclass(frozen=True)
class Coherence:
    labels: list[str]
    """One label per zeroed group (its layer number, or the source name)."""
    delta: np.ndarray
    """(groups, F): relative change of each latent when that group's input is zeroed."""
    coherence: np.ndarray
    """(F,): sum over groups of delta / its maximum; NaN where the latent never fired or never changed."""
    frequency: np.ndarray
    """(F,): share of tokens on which the latent fired."""
    n_tokens: int

    def mean(self) -> float:
        """Mean coherence over the latents that fired (NaN if none did)."""
        finite = self.coherence[np.isfinite(self.coherence)]
        return float(finite.mean()) if finite.size else float("nan")


class CoherenceSums:
    """Streaming sums of |f - f^(-l)| and f over batches of raw activations."""

    def __init__(self, model: Crosscoder, groups: dict[str, list[str]] | None = None):
        self.model, self.groups = model, groups or layer_groups(model)
        device = model.b_enc.device
        self.change = torch.zeros(len(self.groups), model.n_latents, dtype=torch.float64, device=device)
        self.total = torch.zeros(model.n_latents, dtype=torch.float64, device=device)
        self.fired = torch.zeros(model.n_latents, dtype=torch.float64, device=device)
        self.n_tokens = 0

    @torch.no_grad()
    def add(self, x: dict[str, Tensor]) -> None:
        m = self.model
        part = {label: sum((x[n].to(m.b_enc) * m.scale(n)) @ m.encoder_weight(n) for n in names)
                for label, names in self.groups.items()}
        pre = m.b_enc + sum(part.values())
        f = m.activate(pre, batch_select=False)
        for g, contribution in enumerate(part.values()):
            self.change[g] += (f - m.activate(pre - contribution, batch_select=False)).abs().sum(0).double()
        self.total += f.sum(0).double()
        self.fired += (f > 0).sum(0).double()
        self.n_tokens += f.shape[0]

    def result(self) -> Coherence:
        delta = (self.change / (self.total + EPSILON)).cpu().numpy()
        peak = delta.max(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            coherence = np.where((peak > 0) & (self.fired.cpu().numpy() > 0), delta.sum(0) / peak, np.nan)
        return Coherence(list(self.groups), delta, coherence, (self.fired / max(self.n_tokens, 1)).cpu().numpy(),
                         self.n_tokens)


def functional_coherence(model: Crosscoder, batches, groups: dict[str, list[str]] | None = None) -> Coherence:
    """Functional coherence of every latent over `batches` (dicts source -> raw activations).

    The model is put in eval mode for the pass and restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        sums = CoherenceSums(model, groups)
        for x in batches:
            sums.add(x)
    finally:
        model.train(was_training)
    return sums.result()
