"""How well a crosscoder reconstructs rows of a store: FVU, L0 and the latents that fire.

    FVU_s      = sum_x ||x_s - x̂_s||^2 / sum_x ||x_s - mean_s||^2     per written source
    FVU_total  = the same sums over all written sources, in normalised units
    L0         = mean number of nonzero latents per token, with quantiles

Measured as consumers see the model (eval mode: BatchTopK uses its threshold). `xc eval`
reports it; `xc train` measures its held-out chunks with it.
"""

from dataclasses import dataclass

import numpy as np
import torch

from xcli.crosscoder.model import Crosscoder
from xcli.data.loader import StoreSet, eval_batches

L0_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


@dataclass
class Reconstruction:
    tokens: int
    fvu: dict[str, float]
    fvu_total: float
    l0: float
    l0_histogram: np.ndarray
    """(F + 1,) number of tokens with 0, 1, ..., F nonzero latents."""
    fired: np.ndarray
    """(F,) whether each latent fired on some row."""

    def summary(self) -> dict:
        return {"tokens": self.tokens, "fvu": self.fvu, "fvu_total": self.fvu_total, "l0": self.l0,
                "l0_quantiles": {str(q): histogram_quantile(self.l0_histogram, q) for q in L0_QUANTILES},
                "dead_fraction": 1 - float(self.fired.mean())}


def histogram_quantile(histogram: np.ndarray, q: float) -> int:
    """The q-quantile of integer values given their histogram: the smallest v with
    P(value <= v) >= q (numpy's "inverted_cdf")."""
    cumulative = np.cumsum(histogram)
    return int(np.searchsorted(cumulative, q * cumulative[-1] - 1e-9 * cumulative[-1]))


@torch.no_grad()
def reconstruction(model: Crosscoder, stores: StoreSet, chunks, batch_size: int, device: torch.device,
                   dtype: str = "float32") -> Reconstruction | None:
    """FVU per source and in total, L0 and the latents that fire on the rows of `chunks`,
    as consumers see the model (eval mode: BatchTopK uses its threshold). FVU uses the mean
    of these rows; sums are float64."""
    if len(chunks) == 0:
        return None
    was_training = model.training
    model.eval()
    n, nonzero = 0, 0.0
    fired = torch.zeros(model.n_latents, dtype=torch.bool, device=device)
    histogram = torch.zeros(model.n_latents + 1, dtype=torch.int64, device=device)
    err = {s: 0.0 for s in model.write}
    total = {s: torch.zeros(model.decoder_bias(s).shape[0], dtype=torch.float64, device=device) for s in model.write}
    square = {s: 0.0 for s in model.write}
    for batch in eval_batches(stores, [s.name for s in model.sources], chunks, batch_size):
        x = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            f = model.encode(x)
            recon = model.decode_normalised(f)
        target = model.normalise({s: x[s] for s in model.write})
        for s in model.write:
            err[s] += float((target[s] - recon[s].float()).double().pow(2).sum())
            total[s] += target[s].double().sum(0)
            square[s] += float(target[s].double().pow(2).sum())
        active = f != 0
        nonzero += float(active.sum())
        fired |= active.any(0)
        histogram += torch.bincount(active.sum(1), minlength=model.n_latents + 1)
        n += f.shape[0]
    model.train(was_training)
    var = {s: square[s] - float(total[s].pow(2).sum()) / n for s in model.write}
    return Reconstruction(
        tokens=n, fvu={s: err[s] / var[s] if var[s] > 0 else float("nan") for s in model.write},
        fvu_total=sum(err.values()) / sum(var.values()) if sum(var.values()) > 0 else float("nan"),
        l0=nonzero / n, l0_histogram=histogram.cpu().numpy(), fired=fired.cpu().numpy())
