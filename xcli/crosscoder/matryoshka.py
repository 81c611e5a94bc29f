"""Matryoshka crosscoders (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka SAEs").

A BatchTopK crosscoder whose dictionary has nested prefixes of widths w_1 < ... < w_M = F.
Selection is BatchTopK over the whole dictionary, as in the paper; then every prefix must
reconstruct the input by itself, with the latents beyond it dropped:

    x̂_s^(m) = Σ_{i < w_m} f_i W_dec,i^s + b_dec^s
    recon    = Σ_m weight_m · Σ_{s in write} mean_tokens ||x_s - x̂_s^(m)||^2

The first latents then have to explain the input alone, so they learn general features
(a parent concept) that later latents (its children) cannot absorb. The weights are
uniform, 1/M each: the paper sums the prefixes' losses with equal weight (so does
SAELens's MatryoshkaBatchTopK); dividing by M keeps the loss on the scale of one
reconstruction, so that the learning-rate default, --clip and the AuxK weight mean
what they mean for batchtopk. AuxK trains dead latents on the residual of the whole
dictionary (SAELens's default), and the inference threshold is batchtopk's: at
inference a Matryoshka crosscoder is a batchtopk crosscoder.

On the sparse path each group's selected pairs (w_{m-1} <= latent < w_m) are decoded
once and the prefixes are running sums of the groups: no more work than one decode.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from xcli.crosscoder import sparse
from xcli.crosscoder.config import check_prefix_widths
from xcli.errors import BadInput


@dataclass(frozen=True)
class Prefixes:
    """The nested prefixes of a Matryoshka crosscoder and their loss weights."""

    widths: tuple[int, ...]
    """Strictly increasing; the last is the number of latents."""
    weights: tuple[float, ...]
    """One per prefix, summing to 1."""

    @classmethod
    def uniform(cls, widths) -> "Prefixes":
        widths = tuple(int(w) for w in widths)
        return cls(widths, tuple(1 / len(widths) for _ in widths))

    def to_json(self) -> dict:
        return {"widths": list(self.widths), "weights": list(self.weights)}

    @classmethod
    def from_json(cls, value, n_latents: int, where: str) -> "Prefixes":
        """A checkpoint's "matryoshka" object, checked: one BadInput naming `where`."""
        if not isinstance(value, dict) or set(value) != {"widths", "weights"}:
            raise BadInput(f"{where}: matryoshka {value!r:.60} is not an object of widths and weights")
        widths, weights = value["widths"], value["weights"]
        if not isinstance(widths, list):
            raise BadInput(f"{where}: matryoshka.widths {widths!r:.60} is not a list of prefix widths")
        check_prefix_widths(widths, label=f"{where}: matryoshka.widths")
        if widths[-1] != n_latents:
            raise BadInput(f"{where}: matryoshka.widths ends at {widths[-1]}, not at n_latents ({n_latents})")
        if not (isinstance(weights, list) and len(weights) == len(widths)
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                        for w in weights) and sum(weights) > 0):
            raise BadInput(f"{where}: matryoshka.weights {weights!r:.60} is not a list of {len(widths)} "
                           f"finite weights of at least 0, not all 0")
        return cls(tuple(widths), tuple(float(w) for w in weights))

    @property
    def starts(self) -> tuple[int, ...]:
        return (0, *self.widths[:-1])


def decode_groups(pairs: sparse.Pairs, values: Tensor, decoders: list[Tensor],
                  prefixes: Prefixes) -> list[list[Tensor]]:
    """Prefix reconstructions on the sparse path (without bias): result[m][s] = Σ over the
    selected pairs with latent < widths[m] of v · W_dec^s[latent], (B, d_s), differentiable.

    Each group is decoded once from its own pairs (the pairs stay sorted by token); the
    prefixes are running sums."""
    group = torch.bucketize(pairs.cols, torch.as_tensor(prefixes.widths, device=pairs.cols.device), right=True)
    out, running = [], None
    for m in range(len(prefixes.widths)):
        mine = group == m
        part = sparse.decode(sparse.Pairs(pairs.rows[mine], pairs.cols[mine], pairs.n_rows, pairs.n_latents),
                             values[mine], decoders)
        running = part if running is None else [a + b for a, b in zip(running, part)]
        out.append(running)
    return out


def dense_prefixes(f: Tensor, decoders: list[Tensor], prefixes: Prefixes) -> list[list[Tensor]]:
    """The same from dense latents f (B, F): each group's slice of f times its decoder rows, summed."""
    out, running = [], None
    for start, stop in zip(prefixes.starts, prefixes.widths):
        part = [f[:, start:stop].to(w.dtype) @ w[start:stop] for w in decoders]
        running = part if running is None else [a + b for a, b in zip(running, part)]
        out.append(running)
    return out


def prefix_losses(target: dict[str, Tensor], prefix_recons: list[list[Tensor]], biases: list[Tensor],
                  names: list[str], batch: int) -> Tensor:
    """(M,) per prefix: Σ_s Σ_tokens ||x_s - x̂_s^(m)||^2 / batch, normalised units."""
    return torch.stack([sum((target[n] - (y.float() + b)).pow(2).sum() for n, y, b in zip(names, recon, biases))
                        / batch for recon in prefix_recons])
