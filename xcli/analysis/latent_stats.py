"""Per-latent statistics from one streaming pass over an activation store.

Used by `xc classify --store`. Rows are read chunk by chunk and encoded in token
batches of at most `batch_elements / F` rows, so memory never grows with the number
of tokens and no (tokens x F) array exists beyond one batch. What needs only the
latents that fire (sums, Latent Scaling) works on the nonzeros of the batch, in
slices of at most `batch_elements / D` entries: trained crosscoders are sparse,
so this costs far less than dense (B x F) products.

Activity: frequency (share of tokens where f_j > 0), mean_activation (mean of f_j
over those tokens), max_activation.

Latent Scaling (Minder et al. 2025), for models A and B whose sources correspond:
the fitted direction d of latent j is its decoder vector on its larger side (the
owner). For each model m and target y, the least-squares scale of f_j d is
    beta = sum_x f_j(x) <d, y(x)> / (||d||^2 sum_x f_j(x)^2)
accumulated exactly (only tokens where f_j > 0 contribute). The targets, in
normalised units, with a_hat_m the crosscoder's reconstruction of model m:
    error           a_m - a_hat_m + f_j d_j^m    (latent j's own term added back)
    reconstruction  a_hat_m for the owner; a_hat_m - f_j d_j^m for the other model
The latent's own terms are added in closed form at the end:
sum_x f_j <d, f_j d_j^m> = (sum_x f_j^2) <d, d_j^m>.

Functional coherence (fmxcoders, Demou et al. 2026): for each layer l, zero the
encoder input of layer l and re-encode; delta_l = sum_x |f_j - f_j^(-l)| /
(sum_x f_j + 1e-8); coherence = sum_l delta_l / max_l delta_l, from 1 (one layer
drives the latent) to L (all layers equally).
"""

import numpy as np
import torch
from torch import Tensor

from xcli import console
from xcli.crosscoder.model import Crosscoder
from xcli.data.store import ActivationStore
from xcli.errors import BadInput
from xcli.source import Source

COHERENCE_EPS = 1e-8


def check_store(model: Crosscoder, store: ActivationStore, needed: list[str]) -> None:
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
    """Dicts of (rows, d) float32 arrays, reading whole store chunks."""
    for start in range(0, n_tokens, store.chunk_rows):
        chunk = store.read_rows(start, min(start + store.chunk_rows, n_tokens), names)
        length = next(iter(chunk.values())).shape[0]
        for b in range(0, length, rows):
            yield {n: a[b:b + rows] for n, a in chunk.items()}


class Nonzeros:
    """The nonzero entries (token, latent, value) of a batch of latents f (B, F)."""

    def __init__(self, f: Tensor):
        self.rows, self.cols = f.nonzero(as_tuple=True)
        self.vals = f[self.rows, self.cols]
        self.shape = f.shape

    def slices(self, length: int):
        for a in range(0, len(self.vals), length):
            yield self.rows[a:a + length], self.cols[a:a + length], self.vals[a:a + length]

    def sparse(self) -> Tensor:
        return torch.sparse_coo_tensor(torch.stack([self.rows, self.cols]), self.vals, self.shape,
                                       check_invariants=False, is_coalesced=True)  # nonzero() is sorted


class Activity:
    def __init__(self, F: int, device):
        self.count = torch.zeros(F, dtype=torch.float64, device=device)
        self.f_sum, self.f_sq = torch.zeros_like(self.count), torch.zeros_like(self.count)
        self.f_max = torch.zeros(F, device=device)
        self.n_tokens = 0

    def add(self, f: Tensor, nz: Nonzeros) -> None:
        self.n_tokens += f.shape[0]
        vals = nz.vals.double()
        self.count.index_add_(0, nz.cols, torch.ones_like(vals))
        self.f_sum.index_add_(0, nz.cols, vals)
        self.f_sq.index_add_(0, nz.cols, vals * vals)
        self.f_max.scatter_reduce_(0, nz.cols, nz.vals, reduce="amax")  # f >= 0: the max is among nonzeros

    def result(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "frequency": (self.count / self.n_tokens).cpu().numpy(),
                "mean_activation": (self.f_sum / self.count).cpu().numpy(),  # NaN where it never fires
                "max_activation": self.f_max.double().cpu().numpy(),
            }


class LatentScaling:
    """Sums for the betas of every latent against both models' error and reconstruction."""

    def __init__(self, model: Crosscoder, matched: list[tuple[Source, Source]], slice_elements: int):
        self.model, self.matched = model, matched
        self.sides = [[pair[side].name for pair in matched] for side in (0, 1)]
        self.dec = [_concat([model.decoder_weight(n) for n in names]) for names in self.sides]  # (F, D) each
        self.owner = (self.dec[1].norm(dim=1) > self.dec[0].norm(dim=1)).long()  # 0 = A, 1 = B
        self.direction = torch.where(self.owner[:, None].bool(), self.dec[1], self.dec[0])
        F, D = self.direction.shape
        # sums[t, j] = sum_x f_j <d_j, y_t(x)> for t = error A, reconstruction A, error B, reconstruction B
        self.sums = torch.zeros(4, F, dtype=torch.float64, device=self.direction.device)
        self.slice = max(1, slice_elements // (4 * D))

    def add(self, x: dict[str, Tensor], nz: Nonzeros) -> None:
        f_sparse = nz.sparse()
        targets = []
        for names in self.sides:
            xn = torch.cat([x[n] * self.model.scale(n) for n in names], dim=1)
            recon = torch.cat([torch.sparse.mm(f_sparse, self.model.decoder_weight(n))
                               + self.model.decoder_bias(n) for n in names], dim=1)
            targets += [xn - recon, recon]
        y = torch.stack(targets, dim=1)  # (B, 4, D)
        for rows, cols, vals in nz.slices(self.slice):
            projection = torch.einsum("ntd,nd->nt", y[rows], self.direction[cols])  # (n, 4)
            self.sums.index_add_(1, cols, (vals[:, None] * projection).T.double())

    def result(self, f_sq: Tensor) -> dict[str, np.ndarray]:
        d = self.direction
        dd = (d * d).sum(1, dtype=torch.float64)  # ||d||^2
        own = torch.stack([(d * dec).sum(1, dtype=torch.float64) for dec in self.dec])  # <d, d_j^m>, (2, F)
        denom = f_sq * dd
        beta_err = (self.sums[[0, 2]] + f_sq * own) / denom
        is_owner = torch.stack([self.owner == 0, self.owner == 1])
        rec = self.sums[[1, 3]]
        beta_rec = torch.where(is_owner, rec, rec - f_sq * own) / denom
        idx = torch.arange(d.shape[0], device=d.device)
        other = 1 - self.owner
        return {
            "owner": self.owner.cpu().numpy(),
            "beta_error": beta_err.T.cpu().numpy(),
            "beta_reconstruction": beta_rec.T.cpu().numpy(),
            "nu_epsilon": (beta_err[other, idx] / beta_err[self.owner, idx]).cpu().numpy(),
            "nu_r": (beta_rec[other, idx] / beta_rec[self.owner, idx]).cpu().numpy(),
        }


class Coherence:
    """Change of every latent when one layer's encoder input is zeroed."""

    def __init__(self, model: Crosscoder, layers: list[int]):
        by_name = {s.name: s for s in model.sources}
        self.model = model
        self.members = [[n for n in model.read if by_name[n].layer == layer] for layer in layers]
        self.change = torch.zeros(len(layers), model.n_latents, dtype=torch.float64, device=model.b_enc.device)

    def add(self, x: dict[str, Tensor], pre: Tensor, f: Tensor) -> None:
        m = self.model
        for k, names in enumerate(self.members):
            masked = pre
            for n in names:
                masked = masked - (x[n] * m.scale(n)) @ m.encoder_weight(n)
            self.change[k] += (f - m.activate(masked, batch_select=False)).abs().sum(0)

    def result(self, f_sum: Tensor) -> np.ndarray:
        delta = (self.change / (f_sum + COHERENCE_EPS)).cpu().numpy()  # (L, F)
        peak = delta.max(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(peak > 0, delta.sum(0) / peak, np.nan)


def _concat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def coherence_layers(model: Crosscoder) -> list[int] | None:
    """The layers of the read sources, when they span more than one layer."""
    layers = [s.layer for s in model.sources if s.name in model.read]
    if None in layers or len(set(layers)) < 2:
        return None
    return sorted(set(layers))


@torch.no_grad()
def scan_store(model: Crosscoder, store: ActivationStore, matched: list[tuple[Source, Source]] | None = None,
               *, max_tokens: int | None = None, batch_elements: int = 1 << 22, device="cpu") -> dict:
    """One pass over the store. Returns n_tokens, activity, and scaling / coherence where they apply.

    The model is moved to `device` and put in eval mode.
    """
    model = model.to(torch.device(device)).eval()
    F = model.n_latents
    pair_names = [t.name for pair in (matched or []) for t in pair]
    needed = list(dict.fromkeys(model.read + pair_names))
    check_store(model, store, needed)
    n_tokens = min(store.n_tokens, max_tokens or store.n_tokens)
    rows = max(1, min(store.chunk_rows, batch_elements // F))

    activity = Activity(F, model.b_enc.device)
    scaling = LatentScaling(model, matched, batch_elements) if matched else None
    layers = coherence_layers(model)
    coherence = Coherence(model, layers) if layers else None

    bar = console.progress(total=n_tokens, desc="classify", unit="tok")
    for batch in token_batches(store, needed, n_tokens, rows):
        x = {n: torch.from_numpy(v).to(model.b_enc.device) for n, v in batch.items()}
        pre = model.pre_activations(x)  # (B, F)
        f = model.activate(pre, batch_select=False)
        nz = Nonzeros(f)
        activity.add(f, nz)
        if scaling:
            scaling.add(x, nz)
        if coherence:
            coherence.add(x, pre, f)
        bar.update(f.shape[0])
    bar.close()

    out = {"n_tokens": n_tokens, "activity": activity.result()}
    if scaling:
        out["scaling"] = scaling.result(activity.f_sq)
    if coherence:
        out["coherence"] = coherence.result(activity.f_sum)
    return out
