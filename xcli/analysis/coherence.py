"""Functional coherence over batches of activations: per latent, and its mean (fmxcoders).

The per-latent statistic is xcli.analysis.latent_stats.Coherence, the one `xc classify --store`
reports: zero the encoder input of one layer at a time, delta_l = sum_x |f - f^(-l)| /
(sum_x f + 1e-8), coherence = sum_l delta_l / max_l delta_l, from 1 (one layer drives the
latent) to L (all layers equally). This module runs it over any iterable of batches (for
benchmarks and evaluations that hold rows in memory) and adds the summary: the mean over
the latents that fired.
"""

from dataclasses import dataclass

import numpy as np
import torch

from xcli.analysis.latent_stats import Coherence, coherence_layers
from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput


@dataclass(frozen=True)
class CoherenceSummary:
    layers: list[int]
    """The layers zeroed in turn (all read sources of a layer at once)."""
    coherence: np.ndarray
    """(F,) functional coherence per latent; NaN where zeroing no layer changes the latent."""
    frequency: np.ndarray
    """(F,) share of tokens on which the latent fired."""
    n_tokens: int

    def mean(self) -> float:
        """Mean coherence over the latents that fired (NaN if none did)."""
        values = self.coherence[(self.frequency > 0) & np.isfinite(self.coherence)]
        return float(values.mean()) if values.size else float("nan")


@torch.no_grad()
def functional_coherence(model: Crosscoder, batches) -> CoherenceSummary:
    """Coherence of every latent over `batches` (dicts: read source -> raw activations (B, d)).

    Latents are encoded as consumers see them: eval mode (BatchTopK with its threshold);
    the model's mode is restored afterwards.
    """
    layers = coherence_layers(model)
    if layers is None:
        raise BadInput("functional coherence needs a crosscoder that reads sources on two or more layers "
                       "(sources with layer numbers)")
    was_training = model.training
    model.eval()
    device = model.b_enc.device
    sums = Coherence(model, layers)
    f_sum = torch.zeros(model.n_latents, dtype=torch.float64, device=device)
    fired = torch.zeros_like(f_sum)
    n_tokens = 0
    try:
        for batch in batches:
            x = {n: torch.as_tensor(batch[n]).to(device, torch.float32) for n in model.read}
            pre = model.pre_activations(x)
            f = model.activate(pre, batch_select=False)
            sums.add(x, pre, f)
            f_sum += f.sum(0).double()
            fired += (f > 0).sum(0).double()
            n_tokens += f.shape[0]
    finally:
        model.train(was_training)
    return CoherenceSummary(layers, sums.result(f_sum), (fired / max(n_tokens, 1)).cpu().numpy(), n_tokens)
