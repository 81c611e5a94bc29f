"""Model parallel over sources: `torchrun --nproc-per-node N -m xcli train --split-sources ...`.

A crosscoder over many layers can outgrow one GPU (weights and Adam state take
32 bytes × Σ_s d_s × F), and data parallelism does not help: every rank holds it
all. With --split-sources, rank r of N owns a contiguous group of sources (balanced
by width) and holds only their encoder slices W_enc^s, decoder slices W_dec^s,
decoder biases and Adam moments. The encoder bias, the BatchTopK threshold and the
dead-latent counters are replicated and stay identical. Every rank trains on the
same batches, reading only its own sources' columns of the store. In a step:

    pre   = Σ_ranks Σ_{s local} x_s W_enc^s + b_enc      one all_reduce of the (B, F) matmul
    score = pre · Σ_ranks Σ_{s local} ||W_dec,i^s||       one all_reduce of (F,)
    the same TopK / BatchTopK pairs on every rank, with no further exchange
    x̂_s and the loss: each rank its own sources (the loss is the sum of the ranks' parts;
          AuxK's residual variance is summed over the ranks)
    dv_n  = Σ_ranks Σ_{s local} ⟨g_s[b_n], W_dec^s[i_n]⟩  one all_reduce of (N,) in the backward
    dW_enc^s, db_enc from dv_n on each rank (db_enc comes out identical everywhere)

The cross-rank sums are Comm.sum (forward, without grad) and Comm.sum_gradient
(the backward of dv), so xcli.crosscoder.sparse's autograd Functions are unchanged, and the
weights are those of one process up to float rounding. Rank 0 keeps a full copy of
the crosscoder on the CPU (the host copy): it initialises the ranks from it, gathers
their tensors into it one at a time to write the ordinary checkpoint and training
state, and loads the training state into it to resume.
"""

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from xcli.crosscoder.model import Crosscoder
from xcli.distributed import Comm
from xcli.errors import BadInput


def assign(widths: dict[str, int], read, write, world: int) -> list[list[str]]:
    """Contiguous groups of sources, one per rank, that minimise the largest group's
    parameter count (d_s once for the encoder if read, once for the decoder if written)."""
    names = list(widths)
    if world > len(names):
        raise BadInput(f"--split-sources gives each of the {world} ranks at least one source, and there are "
                       f"{len(names)} ({', '.join(names)}); use --nproc-per-node {len(names)} or fewer")
    cost = [widths[n] * ((n in read) + (n in write)) for n in names]
    prefix = [0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    # best[g][j]: the smallest largest cost of g groups over the first j sources (linear partition)
    best = [[math.inf] * (len(names) + 1) for _ in range(world + 1)]
    cut = [[0] * (len(names) + 1) for _ in range(world + 1)]
    best[0][0] = 0
    for g in range(1, world + 1):
        for j in range(g, len(names) + 1):
            for i in range(g - 1, j):
                value = max(best[g - 1][i], prefix[j] - prefix[i])
                if value < best[g][j]:
                    best[g][j], cut[g][j] = value, i
    groups, j = [], len(names)
    for g in range(world, 0, -1):
        groups.insert(0, names[cut[g][j]:j])
        j = cut[g][j]
    for r, group in enumerate(groups):
        for side, names_on_side in (("the encoder reads", read), ("the decoder writes", write)):
            if not any(n in names_on_side for n in group):
                raise BadInput(f"--split-sources: rank {r} would own {', '.join(group)}, none of which {side}; "
                               f"every rank needs a source the encoder reads and one the decoder writes: "
                               f"use fewer ranks")
    return groups


def tensors(model: Crosscoder) -> dict[str, Tensor]:
    """The model's tensors by checkpoint name (views of its parameters and buffers)."""
    out = {"encoder_bias": model.b_enc, "threshold": model.threshold}
    out.update({f"encoder.{n}": model.encoder_weight(n) for n in model.read})
    out.update({f"decoder.{n}": model.decoder_weight(n) for n in model.write})
    out.update({f"decoder_bias.{n}": model.decoder_bias(n) for n in model.write})
    out.update({f"input_scale.{s.name}": model.scale(s.name) for s in model.sources})
    return out


def parameter_names(model: Crosscoder) -> list[str]:
    """Checkpoint names of model.parameters(), in that order (the optimizer's indices)."""
    by_id = {id(t): key for key, t in tensors(model).items()}
    return [by_id[id(p)] for p in model.parameters()]


class SourceShard:
    """This rank's share of a crosscoder split over sources, and the transfers to and from rank 0.

    Tensors are named as in the checkpoint (`tensors`); the arguments after `device` describe
    the whole crosscoder, and every rank walks its tensors in the same order."""

    def __init__(self, comm: Comm, groups: list[list[str]], device: torch.device, sources, n_latents: int,
                 arch: str, k: int, read, write):
        self.comm, self.groups, self.device = comm, groups, device
        self.sources, self.n_latents, self.arch, self.k = list(sources), n_latents, arch, k
        self.read, self.write = list(read), list(write)
        self.owner = {name: r for r, group in enumerate(groups) for name in group}
        with torch.device("meta"):  # the whole crosscoder's layout, without its memory
            whole = Crosscoder(self.sources, n_latents, arch, k, self.read, self.write)
        self.keys = list(tensors(whole))
        self.parameter_keys = parameter_names(whole)  # the order of one Adam over the whole crosscoder

    @property
    def names(self) -> list[str]:
        """The sources this rank owns."""
        return self.groups[self.comm.rank]

    def local_model(self, host: Crosscoder | None) -> Crosscoder:
        """This rank's crosscoder (its sources only) on the device, with the values of rank 0's host copy."""
        mine = self.names
        model = Crosscoder([s for s in self.sources if s.name in mine], self.n_latents, self.arch, self.k,
                           [n for n in self.read if n in mine], [n for n in self.write if n in mine])
        model = model.to(self.device)
        model.source_comm = self.comm
        self.load_model(model, host)
        return model

    def load_model(self, model: Crosscoder, host: Crosscoder | None) -> None:
        self.scatter(tensors(host) if host is not None else None, tensors(model), self.keys)

    def gather_model(self, model: Crosscoder, host: Crosscoder | None) -> None:
        """Rank 0's host copy takes every rank's current values."""
        self.gather(tensors(model), tensors(host) if host is not None else None, self.keys)

    def holders(self, key: str) -> list[int]:
        """The ranks that hold a tensor: its source's owner, or all of them (replicated)."""
        if "." not in key:
            return list(range(self.comm.world))
        return [self.owner[key.split(".", 1)[1]]]

    # -- rank 0 <-> the ranks, one tensor at a time -----------------------------------------
    @torch.no_grad()
    def scatter(self, full: dict[str, Tensor] | None, local: dict[str, Tensor], keys: list[str]) -> None:
        """Copy rank 0's tensors (`full`) into each holder's own (`local`)."""
        rank = self.comm.rank
        for key in keys:
            for r in self.holders(key):
                if r == rank == 0:
                    local[key].copy_(full[key])
                elif rank == 0:
                    dist.send(full[key].to(self.device).contiguous(), r)
                elif rank == r:
                    buffer = torch.empty(local[key].shape, dtype=local[key].dtype, device=self.device)
                    dist.recv(buffer, 0)
                    local[key].copy_(buffer)

    @torch.no_grad()
    def gather(self, local: dict[str, Tensor], into: dict[str, Tensor] | None, keys: list[str]) -> None:
        """Copy each tensor from its (first) holder into rank 0's `into`."""
        rank = self.comm.rank
        for key in keys:
            r = self.holders(key)[0]
            if r == rank == 0:
                into[key].copy_(local[key])
            elif rank == 0:
                buffer = torch.empty(into[key].shape, dtype=into[key].dtype, device=self.device)
                dist.recv(buffer, r)
                into[key].copy_(buffer)
            elif rank == r:
                dist.send(local[key].detach().contiguous(), 0)

    # -- Adam state ---------------------------------------------------------------------------
    def gather_optimizer(self, opt, model: Crosscoder, host: Crosscoder | None) -> dict | None:
        """On rank 0: the state_dict of one Adam over the whole crosscoder (the host copy's
        parameter order), as a one-process run saves it; None on the other ranks."""
        saved = opt.state_dict()
        local = {key: saved["state"][i] for i, key in enumerate(parameter_names(model))}
        host_tensors = tensors(host) if host is not None else None
        moments = {}
        for moment in ("exp_avg", "exp_avg_sq"):
            into = {key: torch.empty_like(host_tensors[key]) for key in self.parameter_keys} if host else None
            self.gather({key: s[moment] for key, s in local.items()}, into, self.parameter_keys)
            moments[moment] = into
        if host is None:
            return None
        step = local["encoder_bias"]["step"].detach().cpu()  # every parameter has taken the same steps
        state = {i: {"step": step.clone(), **{m: moments[m][key] for m in moments}}
                 for i, key in enumerate(self.parameter_keys)}
        group = {**saved["param_groups"][0], "params": list(range(len(state)))}
        return {"state": state, "param_groups": [group]}

    def load_optimizer(self, opt, model: Crosscoder, full_state: dict) -> None:
        """Give this rank's Adam its parameters' moments from one Adam's state_dict over the
        whole crosscoder (every rank passes it, read with mmap; rank 0 sends the moments)."""
        if not full_state["state"]:
            return
        names = parameter_names(model)
        params = dict(zip(names, model.parameters()))
        step = next(iter(full_state["state"].values()))["step"]
        local = {key: {"step": step.clone()} for key in names}
        for moment in ("exp_avg", "exp_avg_sq"):
            mine = {key: torch.zeros_like(params[key]) for key in names}
            full = ({key: full_state["state"][i][moment] for i, key in enumerate(self.parameter_keys)}
                    if self.comm.main else None)
            self.scatter(full, mine, self.parameter_keys)
            for key in names:
                local[key][moment] = mine[key]
        group = {**full_state["param_groups"][0], "params": list(range(len(names)))}
        opt.load_state_dict({"state": {i: local[key] for i, key in enumerate(names)}, "param_groups": [group]})


# -- the training step's cross-rank pieces -----------------------------------------------------

def clip_grad_norm(model: Crosscoder, max_norm: float) -> Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole crosscoder: the squared norms of this
    rank's slices summed over the ranks, the replicated encoder bias counted once."""
    own = [p.grad for p in model.parameters() if p.grad is not None and p is not model.b_enc]
    squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in own]).pow(2).sum()
    total = model.source_comm.sum(squares)
    if model.b_enc.grad is not None:
        total = total + model.b_enc.grad.float().pow(2).sum()
    total = total.sqrt()
    coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coefficient.to(p.grad.dtype))
    return total


@torch.no_grad()
def held_out_metrics(model: Crosscoder, batches: Iterable[dict[str, Tensor]], device: torch.device,
                     write: list[str]) -> dict | None:
    """xcli.train.loop.held_out_metrics with the sources split over the ranks (every rank calls it): FVU per
    source and in total, L0 and dead fraction on the held-out rows, in float32, BatchTopK
    with its threshold. `batches` are the held-out rows of this rank's sources; None when there are none."""
    was_training = model.training
    model.eval()
    comm, n, nonzero = model.source_comm, 0, torch.zeros((), dtype=torch.float64, device=device)
    fired = torch.zeros(model.n_latents, dtype=torch.bool, device=device)
    sums = {s: torch.zeros(3, dtype=torch.float64, device=device) for s in model.write}  # err, Σx², ||Σx||²
    totals = {s: torch.zeros(model.decoder_bias(s).shape[0], dtype=torch.float64, device=device)
              for s in model.write}
    for batch in batches:
        x = {k: v.to(device).float() for k, v in batch.items()}
        out = model.forward_sparse(x, batch_select=False)
        target = model.normalise({s: x[s] for s in model.write})
        for s in model.write:
            sums[s][0] += (target[s] - out.reconstruction[s]).double().pow(2).sum()
            sums[s][1] += target[s].double().pow(2).sum()
            totals[s] += target[s].double().sum(0)
        active = (out.values != 0).float()
        nonzero += active.sum().double()
        fired |= out.pairs.sum_by_latent(active) > 0
        n += next(iter(x.values())).shape[0]
    model.train(was_training)
    if n == 0:  # no held-out rows: the same on every rank, so no rank waits at a collective
        return None
    parts = torch.zeros(len(write), 2, dtype=torch.float64, device=device)  # err, variance per written source
    for s in model.write:
        parts[write.index(s)] = torch.stack([sums[s][0], sums[s][1] - totals[s].pow(2).sum() / n])
    parts = comm.sum(parts).cpu()
    err, var = parts[:, 0].tolist(), parts[:, 1].tolist()
    return {"tokens": n, "fvu": {s: e / v if v > 0 else float("nan") for s, e, v in zip(write, err, var)},
            "fvu_total": sum(err) / sum(var) if sum(var) > 0 else float("nan"), "l0": float(nonzero) / n,
            "dead_fraction": 1 - float(fired.double().mean())}
