"""Train a crosscoder from activation stores (`xc train`).

    from xcli.train import TrainConfig, train
    path = train(TrainConfig(stores=("acts.zarr",), output="xc.safetensors", arch="batchtopk", k=32))

One step, top to bottom (nanoGPT's order): learning rate and L1 schedules ->
forward and loss -> backward -> gradient clipping -> Adam -> dead-latent counters
and the BatchTopK threshold -> log -> evaluation and checkpoint.

Loss, in normalised units (each source scaled so its mean squared norm is d_s):

    recon    = sum_{s in write} mean_tokens ||x_s - x̂_s||^2            (Lindsey et al. 2024)
    sparsity = l1(t) * mean_tokens sum_i f_i sum_s ||W_dec,i^s||      (relu only; l1 warms up over 5%)
    aux      = AuxK: dead latents reconstruct the residual, / its variance (Gao et al. 2024; topk, batchtopk)
    loss     = recon + sparsity + aux / 32

jumprelu instead (xcli.crosscoder.jumprelu): loss = recon + tanh sparsity penalty + pre-activation loss.
Matryoshka (xcli.crosscoder.matryoshka): recon is the weighted sum of every nested prefix's recon.

Resuming: every checkpoint also writes `<output>.state.pt` (weights, Adam, step,
dead-latent counters, threshold, loader position, RNG); `--resume` continues from it
and ends with exactly the weights of an uninterrupted run.
"""

import ctypes
import dataclasses
import errno
import inspect
import json
import math
import os
import shutil
import signal
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from xcli import console, strict_json
from xcli.analysis.reconstruction import reconstruction
from xcli.crosscoder import fmx, jumprelu, source_parallel
from xcli.crosscoder.config import MATRYOSHKA, check_prefix_widths, default_prefix_widths, is_fmx
from xcli.crosscoder.matryoshka import Prefixes, dense_prefixes, prefix_losses
from xcli.crosscoder.model import Crosscoder, read_metadata, save
from xcli.crosscoder.partition import Partition
from xcli.data.loader import BatchStream, Position, StoreSet, eval_batches
from xcli.devices import resolve_device
from xcli.distributed import SINGLE, Comm, launched, local_device, process_group, together
from xcli.errors import BadInput, XcError
from xcli.files import atomic_path, check_output, check_replaceable, output_lock, remove
from xcli.train.config import DEFAULT_SHARED_PENALTY, TrainConfig, exclusive_counts

AUX_WEIGHT = 1 / 32          # AuxK weight (Gao et al. 2024; Minder et al. 2025)
L1_WARMUP_FRACTION = 0.05    # λ rises linearly over the first 5% of steps (Kissane et al.)
THRESHOLD_DECAY = 0.999      # BatchTopK threshold EMA decay (science-of-finetuning/dictionary_learning)
STATE_VERSION = 1
UNSTUDIED_DECODER_NORM = 0.1  # the decoder norm before the unit-norm default (relu, fmx)
K_AUX_MAX = 512              # Gao et al. (2024): k_aux = 512; more makes AuxK dominate a wide crosscoder's step
DEAD_TOKENS_MAX = 10_000_000  # the dead-latent window of Gao et al. (2024), for long runs
DEAD_TOKENS_DIVISOR = 10      # short runs: a tenth of the run, so that AuxK acts (issue 16)
CALIBRATION_ROWS = 32768     # held-out rows on which each checkpoint calibrates the BatchTopK threshold


# -- resolving defaults against the stores ------------------------------------------------

def steps_for_tokens(tokens: int, rows_per_epoch: int, batch_size: int) -> int:
    """Steps that consume at least `tokens` rows when every epoch ends with a partial batch."""
    epochs, rest = divmod(tokens, rows_per_epoch)
    return epochs * -(-rows_per_epoch // batch_size) + -(-rest // batch_size)


def resolve(cfg: TrainConfig, stores: StoreSet) -> TrainConfig:
    """Fill in every default that depends on the data; reject what does not fit it."""
    available = stores.names

    def check_names(label, names, allowed, what):
        for name in names or ():
            if name not in allowed:
                raise BadInput(f"{label} names unknown source {name!r}; {what}: {', '.join(allowed)}")

    check_names("--sources", cfg.sources, available, "the stores have")
    pool = list(cfg.sources) if cfg.sources is not None else available
    what = "--sources gives" if cfg.sources is not None else "the stores have"
    check_names("--read", cfg.read, pool, what)
    check_names("--write", cfg.write, pool, what)
    if cfg.sources is not None and (cfg.read or cfg.write):
        used = set(cfg.read or pool) | set(cfg.write or pool)
        for name in cfg.sources:
            if name not in used:
                raise BadInput(f"--sources names {name!r}, but neither --read nor --write uses it")
    if cfg.sources is None and (cfg.read is not None or cfg.write is not None):
        used = set(cfg.read or ()) | set(cfg.write or ())
        if cfg.read is None or cfg.write is None:  # the unnamed side defaults to all sources
            used = set(available)
        pool = [n for n in available if n in used]
    sources = [n for n in available if n in pool]
    read = [n for n in sources if n in (cfg.read or sources)]
    write = [n for n in sources if n in (cfg.write or sources)]
    widths = {s.name: s.d for s in stores.sources}

    latents = cfg.latents or max(1, round((cfg.expansion or 16) * max(widths[n] for n in sources)))
    k = None if cfg.activation in ("relu", "jumprelu") else (cfg.k or 32)
    if k is not None and k >= latents:
        raise BadInput(f"--k {k} must be below the number of latents ({latents}); lower --k or raise --latents")
    train_chunks, _ = stores.hold_out(cfg.eval_fraction)
    rows = sum(stop - start for start, stop in map(stores.chunk_range, train_chunks))
    steps = cfg.steps or steps_for_tokens(cfg.tokens or rows, rows, cfg.batch_size)
    warmup = cfg.warmup if cfg.warmup is not None else min(1000, steps // 20)
    if warmup > steps:
        raise BadInput(f"--warmup {warmup} is longer than the {steps} steps of this run")
    return dataclasses.replace(
        cfg, sources=tuple(sources), read=tuple(read), write=tuple(write), latents=latents, expansion=None,
        k=k, l1=(2.0 if cfg.l1 is None else cfg.l1) if cfg.activation == "relu" else None,
        k_aux=0 if cfg.activation == "jumprelu" else
        cfg.k_aux if cfg.k_aux is not None else max(1, min(K_AUX_MAX, sum(widths[n] for n in write) // 2)),
        steps=steps, tokens=None, warmup=warmup,
        groups=(check_prefix_widths(cfg.groups or default_prefix_widths(latents), latents)
                if cfg.arch == MATRYOSHKA else None),
        dead_tokens=cfg.dead_tokens or max(1, min(DEAD_TOKENS_MAX, steps * cfg.batch_size // DEAD_TOKENS_DIVISOR)),
        lr=cfg.lr or 2e-4 / math.sqrt(latents / 2 ** 14), device=str(resolve_device(cfg.device)),
        dtype=resolve_dtype(cfg.dtype, resolve_device(cfg.device)),
        **resolve_jumprelu(cfg),
        **fmx.resolve_options(cfg.arch, cfg.factorization, cfg.ranks, cfg.mask_prob,
                              [s for s in stores.sources if s.name in sources], read),
        **resolve_partition(cfg, [s for s in stores.sources if s.name in sources], write, latents))


def resolve_jumprelu(cfg: TrainConfig) -> dict:
    """The jumprelu options' defaults (Anthropic's, xcli.crosscoder.jumprelu); none for other archs."""
    if cfg.activation != "jumprelu":
        return {}
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return {"tanh_penalty": pick(cfg.tanh_penalty, jumprelu.DEFAULT_TANH_PENALTY),
            "tanh_scale": pick(cfg.tanh_scale, jumprelu.DEFAULT_TANH_SCALE),
            "preact_penalty": pick(cfg.preact_penalty, jumprelu.DEFAULT_PREACT_PENALTY),
            "bandwidth": pick(cfg.bandwidth, jumprelu.DEFAULT_BANDWIDTH),
            "initial_threshold": pick(cfg.initial_threshold, jumprelu.DEFAULT_INITIAL_THRESHOLD)}


def resolve_partition(cfg: TrainConfig, sources, write: list[str], latents: int) -> dict:
    """--shared-latents and --exclusive against the sources: the models exist, the blocks fit."""
    if not (cfg.shared_latents or cfg.exclusive):
        return {}
    partition = latent_partition(cfg, latents)
    if partition.size > latents:
        raise BadInput(f"--shared-latents and --exclusive take {partition.size} latents, more than the "
                       f"{latents} there are; raise --latents or give smaller blocks")
    partition.check(sources, write, latents, "--shared-latents/--exclusive")
    return {"shared_penalty": partition.shared_penalty if cfg.shared_latents and cfg.activation == "relu" else None}


def latent_partition(cfg: TrainConfig, latents: int) -> Partition | None:
    if not (cfg.shared_latents or cfg.exclusive):
        return None
    penalty = cfg.shared_penalty if cfg.shared_penalty is not None else DEFAULT_SHARED_PENALTY
    return Partition.layout(cfg.shared_latents, exclusive_counts(cfg.exclusive),
                            penalty if cfg.activation == "relu" else 1.0)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls are native (and so faster than float32) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if fast_bf16(device) else "float32"


# -- schedules (pure functions of the step) ------------------------------------------------

def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, flat, then linear decay to zero over the last `decay` of the steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    decay_start = max(cfg.warmup, cfg.steps - round(cfg.decay * cfg.steps))
    if step < decay_start:
        return cfg.lr
    return cfg.lr * (cfg.steps - step) / (cfg.steps - decay_start)


def l1_at(step: int, cfg: TrainConfig) -> float:
    """λ rises linearly over the first 5% of the steps."""
    ramp = max(1, math.ceil(L1_WARMUP_FRACTION * cfg.steps))
    return (cfg.l1 or 0.0) * min(1.0, (step + 1) / ramp)


def sparsity_at(step: int, cfg: TrainConfig) -> float:
    """The sparsity coefficient of a step: relu's λ (l1_at), or jumprelu's λ_s(t), which rises over the run."""
    if cfg.activation == "jumprelu":
        return jumprelu.tanh_penalty_at(step, cfg.steps, cfg.tanh_penalty)
    return l1_at(step, cfg)


def threshold_decay(updates: int) -> float:
    """A plain running mean for the first 1000 updates, then an EMA with decay 0.999,
    so that short runs do not keep their first, untrained batches in the threshold."""
    return min(THRESHOLD_DECAY, 1 - 1 / updates)


# -- the loss -------------------------------------------------------------------------------

class LossParts(NamedTuple):
    loss: Tensor
    """What is minimised: recon + sparsity + aux / 32."""
    recon: Tensor
    """Sum over written sources of the mean (over tokens) squared error, normalised units (Matryoshka:
    the weighted sum of that over the nested prefixes)."""
    sparsity: Tensor
    """λ · mean over tokens of sum_i f_i sum_s ||W_dec,i^s|| (zero unless relu)."""
    aux: Tensor
    """AuxK loss before its weight (zero when no latent is dead)."""
    sq_err: dict[str, Tensor]
    """Per written source, the batch's summed squared error."""
    variance: dict[str, Tensor]
    """Per written source, the batch's summed squared deviation from its mean (FVU denominator)."""
    l0: Tensor
    """Mean number of nonzero latents per token."""
    fired: Tensor
    """(F,) bool: latents nonzero for some token of the batch."""
    min_score: Tensor | None
    """BatchTopK: the smallest selection score kept in the batch (the inference threshold tracks it)."""
    tokens: int
    preact: Tensor | None = None
    """jumprelu: λ_p · mean over tokens of Σ_i ReLU(θ_i - h_i) Σ_s ||W_dec,i^s|| (None for other archs)."""


def loss_parts(model: Crosscoder, x: dict[str, Tensor], l1: float, dead: Tensor, k_aux: int,
               x_in: dict[str, Tensor] | None = None, batch_rows: int | None = None,
               comm: Comm = SINGLE) -> LossParts:
    """The training loss of one batch of raw activations (topk and batchtopk on the sparse path
    unless `model.sparse_path` is False). x_in: what the encoder reads instead of x (layer
    masking); the targets are always x.

    Data-parallel, x is this rank's share of a batch of `batch_rows` rows: every part is this
    rank's share of the whole batch's value (they add up over the ranks), so that the summed
    gradients are those of the one-process loss."""
    x_in = x if x_in is None else x_in
    target = model.normalise({n: x[n] for n in model.write})
    local = target[model.write[0]].shape[0]
    batch = batch_rows or local
    if model.arch == "jumprelu":
        return jumprelu_loss_parts(model, x_in, target, l1, batch, local)
    if model.arch != "relu" and model.sparse_path:
        out = model.forward_sparse(x_in, batch_rows=batch, comm=comm)
        reconstruction, min_score = out.reconstruction, out.min_score
        nonzero = (out.values != 0).float()
        l0, fired = nonzero.sum() / batch, out.pairs.sum_by_latent(nonzero) > 0
        decode_aux = lambda: model.sparse_aux_reconstruction(out, dead, k_aux)  # noqa: E731
        prefixes = out.prefixes
    else:
        out = model(x_in)
        reconstruction, f = out.reconstruction, out.latents
        l0, fired = (f != 0).sum() / batch, (f != 0).any(0)
        min_score = model.batch_threshold(f) if model.arch == "batchtopk" else None
        decode_aux = lambda: model.decode_normalised(  # noqa: E731
            model.aux_latents(out.pre_activations, dead, k_aux), bias=False)
        prefixes = dense_prefixes(f, list(model.W_dec), model.matryoshka) if model.matryoshka else None
    zero = torch.zeros((), device=l0.device)
    residual, sq_err, variance = {}, {}, {}
    for name in model.write:
        residual[name] = target[name] - reconstruction[name].float()
        sq_err[name] = residual[name].pow(2).sum()
        variance[name] = (target[name] - target[name].mean(0)).pow(2).sum() if local else zero
    recon = sum(sq_err.values()) / batch
    if model.matryoshka:  # every nested prefix reconstructs the input; the last one is the whole dictionary
        losses = prefix_losses(target, prefixes, list(model.b_dec), model.write, batch)
        recon = (losses * torch.as_tensor(model.matryoshka.weights, device=losses.device)).sum()
    sparsity = l1 * (f.float() @ model.decoder_norms().sum(dim=1)).sum() / batch if model.arch == "relu" else zero
    if model.partition and model.partition.tied and model.arch == "relu":  # designated shared: a smaller penalty
        weights = model.partition.penalty_weights(model.n_latents, f.device)
        sparsity = l1 * (f.float() @ (model.decoder_norms().sum(dim=1) * weights)).sum() / batch
    aux = zero
    if model.arch != "relu" and k_aux > 0 and bool(dead.any()):
        aux_recon = decode_aux()
        err = sum((residual[n].detach() - aux_recon[n].float()).pow(2).sum() for n in model.write)
        # The residual's variance over the whole batch, from sums that add up over ranks.
        sums = comm.sum(torch.cat([torch.cat([r.detach().double().sum(0), r.detach().double().pow(2).sum()[None]])
                                   for r in residual.values()]))
        scale, start = 0.0, 0
        for r in residual.values():
            d = r.shape[1]
            scale = scale + sums[start + d] - sums[start:start + d].pow(2).sum() / batch
            start += d + 1
        scale = model.source_comm.sum(scale).float()  # split over sources: the other ranks' sources too
        aux = torch.where(scale > 0, err / scale.clamp_min(1e-30), zero)
    return LossParts(recon + sparsity + AUX_WEIGHT * aux, recon, sparsity, aux, sq_err, variance,
                     l0, fired, min_score, local)


def jumprelu_loss_parts(model: Crosscoder, x_in: dict[str, Tensor], target: dict[str, Tensor], tanh_penalty: float,
                        batch: int, local: int) -> LossParts:
    """The JumpReLU loss (xcli.crosscoder.jumprelu): recon + λ_s(t)·tanh penalty + λ_p·pre-activation loss.

    Dense: the straight-through estimator needs ∂L/∂f_i at every pair within ε/2 of its threshold,
    fired or not, and the pre-activation loss reaches every latent, so a decode of the fired pairs alone
    (the sparse path) would drop part of the thresholds' gradient."""
    out = model(x_in)
    f = out.latents
    norm_sum = model.decoder_norms().sum(dim=1)
    zero = torch.zeros((), device=f.device)
    sq_err, variance = {}, {}
    for name in model.write:
        sq_err[name] = (target[name] - out.reconstruction[name].float()).pow(2).sum()
        variance[name] = (target[name] - target[name].mean(0)).pow(2).sum() if local else zero
    recon = sum(sq_err.values()) / batch
    sparsity = tanh_penalty * jumprelu.tanh_penalty(f, norm_sum, model.tanh_scale) / batch
    preact = model.preact_penalty * jumprelu.preact_penalty(out.pre_activations, model.thresholds(), norm_sum) / batch
    return LossParts(recon + sparsity + preact, recon, sparsity, zero, sq_err, variance,
                     (f != 0).sum() / batch, (f != 0).any(0), None, local, preact)


class TrainingLoss(torch.nn.Module):
    """loss_parts as a module, so that DistributedDataParallel can wrap it."""

    def __init__(self, model: Crosscoder):
        super().__init__()
        self.model = model

    def forward(self, x, l1, dead, k_aux, x_in=None, batch_rows=None, comm=SINGLE) -> LossParts:
        return loss_parts(self.model, x, l1, dead, k_aux, x_in, batch_rows, comm)


# -- evaluation -----------------------------------------------------------------------------

def held_out_metrics(model: Crosscoder, stores: StoreSet, eval_chunks, batch_size: int, device: torch.device,
             dtype: str) -> dict | None:
    """FVU per source and in total, L0 and dead fraction on the held-out rows, as consumers see
    the model (eval mode: BatchTopK uses its threshold); see xcli.analysis.reconstruction."""
    result = reconstruction(model, stores, eval_chunks, batch_size, device, dtype)
    if result is None:
        return None
    return {"tokens": result.tokens, "fvu": result.fvu, "fvu_total": result.fvu_total, "l0": result.l0,
            "dead_fraction": 1 - float(result.fired.mean())}


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")


# -- checkpoints and training state ------------------------------------------------------------

def state_path(output) -> Path:
    """The training-state file beside a checkpoint (used by the writer and by --resume)."""
    return Path(f"{output}.state.pt")


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    position: Position = Position()
    threshold_updates: int = 0
    since_fired: Tensor | None = None
    """Training tokens since each latent last fired, (F,) int64."""
    last_eval: dict | None = None
    last_train: dict | None = None


def run_identity(cfg: TrainConfig, stores: StoreSet) -> dict:
    """What a resumed run must share with the interrupted one: the hyperparameters and the data."""
    return {**cfg.hyperparameters(), "store_rows": stores.n_tokens, "store_tokens_sha256": stores.tokens_sha256}


def save_state(path: Path, model: Crosscoder, optimizer_state: dict, cfg: TrainConfig, stores: StoreSet,
               state: TrainState) -> None:
    payload = {
        "version": STATE_VERSION, "identity": strict_json.dumps(run_identity(cfg, stores)),
        "step": state.step, "tokens": state.tokens, "epoch": state.position.epoch, "row": state.position.row,
        "threshold_updates": state.threshold_updates, "since_fired": state.since_fired.cpu(),
        "last_eval": strict_json.dumps(state.last_eval), "last_train": strict_json.dumps(state.last_train),
        "model": {k: v.cpu() for k, v in model.state_dict().items()}, "optimizer": optimizer_state,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_path(path, overwrite=True) as tmp:
        try:
            torch.save(payload, tmp)
        except RuntimeError as e:  # torch reports a short write (a full disk) as "unexpected pos"
            if "unexpected pos" not in str(e):
                raise
            raise OSError(errno.ENOSPC if shutil.disk_usage(tmp.parent).free < 1 << 20 else errno.EIO,
                          "the training state was written short", str(tmp)) from e


def load_state(path: Path, model: Crosscoder, opt, cfg: TrainConfig, stores: StoreSet,
               device: torch.device) -> TrainState:
    payload = read_state(path, cfg, stores)
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    return train_state(payload, device)


def read_state(path: Path, cfg: TrainConfig, stores: StoreSet, mmap: bool = False) -> dict:
    """The training state file's contents, checked against this run (mmap: read tensors lazily)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise BadInput(f"training state {str(path)!r} cannot be read ({type(e).__name__}); "
                       f"pass --overwrite to start over") from e
    if payload.get("version") != STATE_VERSION:
        raise BadInput(f"training state {str(path)!r} has version {payload.get('version')!r}; "
                       f"this xc resumes version {STATE_VERSION}; pass --overwrite to start over")
    check_same_run(json.loads(payload["identity"]), run_identity(cfg, stores), path)
    return payload


def train_state(payload: dict, device: torch.device) -> TrainState:
    torch.set_rng_state(payload["torch_rng"])
    return TrainState(payload["step"], payload["tokens"], Position(payload["epoch"], payload["row"]),
                      payload["threshold_updates"], payload["since_fired"].to(device),
                      json.loads(payload["last_eval"]), json.loads(payload["last_train"]))


# Options added after runs were recorded: a run recorded without them used these values.
ADDED_LATER = {"shared_latents": 0, "shared_penalty": None, "exclusive": [], "groups": None,
               **dict.fromkeys(("tanh_penalty", "tanh_scale", "preact_penalty", "bandwidth", "initial_threshold"))}


def check_same_run(saved: dict, now: dict, where) -> None:
    saved = {**ADDED_LATER, **saved}
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            what = "the stores' " + key[6:] if key.startswith("store_") else "--" + key.replace("_", "-")
            raise BadInput(f"--resume: {what} is {now.get(key)!r} but the run in {str(where)!r} used "
                           f"{saved.get(key)!r}; repeat the original options, or pass --overwrite to start over")


def write_checkpoint(model: Crosscoder, cfg: TrainConfig, stores: StoreSet, state: TrainState,
                     complete: bool) -> Path:
    latest = state.last_eval or state.last_train or {}
    summary = {
        "complete": complete, "step": state.step, "steps": cfg.steps, "tokens": state.tokens,
        "metrics_from": "eval" if state.last_eval else "train",
        "fvu": latest.get("fvu"), "fvu_total": latest.get("fvu_total"), "l0": latest.get("l0"),
        "dead_fraction": latest.get("dead_fraction"), "eval_tokens": (state.last_eval or {}).get("tokens"),
    }
    extra = {"hyperparameters": cfg.hyperparameters(), "store": stores.identity(), "training": summary,
             "aux": {"weight": AUX_WEIGHT, "k_aux": cfg.k_aux, "dead_tokens": cfg.dead_tokens}}
    return save(model, cfg.output, extra=extra, overwrite=True)


# -- the training run ---------------------------------------------------------------------------

def build_model(cfg: TrainConfig, stores: StoreSet) -> Crosscoder:
    sources = [s for s in stores.sources if s.name in cfg.sources]
    if is_fmx(cfg.arch):
        model = fmx.FmxCrosscoder(sources, cfg.latents, cfg.activation, cfg.k, list(cfg.read), list(cfg.write),
                                  cfg.factorization, cfg.ranks)
    else:  # a Matryoshka crosscoder is a batchtopk one whose loss sees its nested prefixes
        model = Crosscoder(sources, cfg.latents, cfg.activation, cfg.k, list(cfg.read), list(cfg.write))
        model.matryoshka = Prefixes.uniform(cfg.groups) if cfg.arch == MATRYOSHKA else None
    means = {}
    for i, source in enumerate(sources):
        stats = stores.stats(source.name)
        scale = math.sqrt(source.d / stats["mean_sq_norm"]) if stats["mean_sq_norm"] > 0 else float("nan")
        if not math.isfinite(scale):
            raise BadInput(f"source {source.name!r} has mean squared norm {stats['mean_sq_norm']} in its store; "
                           f"it cannot be normalised (all zero, or NaN/inf rows)")
        model.input_scale[i] = scale
        means[source.name] = torch.as_tensor(stats["mean"], dtype=torch.float32)
    # relu and fmxcoders keep decoder rows of norm 0.1 per source: their recipes were not studied
    unstudied = cfg.activation == "relu" or is_fmx(cfg.arch)
    model.init_weights(torch.Generator().manual_seed(cfg.seed), UNSTUDIED_DECODER_NORM if unstudied else None)
    model.init_decoder_bias(means)
    if cfg.activation == "jumprelu":
        configure_jumprelu(model, cfg)
        model.set_thresholds(torch.full((cfg.latents,), cfg.initial_threshold))
    model.partition = latent_partition(cfg, cfg.latents)
    if model.partition:  # tied rows equal and dedicated rows zero from the start; encoder = decoder^T again
        model.partition.enforce(model)
        with torch.no_grad():
            for name in model.read:
                if name in model.write:
                    model.encoder_weight(name).copy_(model.decoder_weight(name).T)
    return model


def configure_jumprelu(model: Crosscoder, cfg: TrainConfig) -> None:
    """The training settings of a JumpReLU model (not part of the checkpoint's tensors)."""
    model.bandwidth, model.tanh_scale, model.preact_penalty = cfg.bandwidth, cfg.tanh_scale, cfg.preact_penalty


def calibration_batches(stores: StoreSet, names: list[str], train_chunks, eval_chunks, batch_size: int,
                        device: torch.device, rows: int = CALIBRATION_ROWS):
    """The first held-out chunks (the first training chunks when none are held out), up to `rows` rows
    (whole chunks, at least one), on the device: where the BatchTopK inference threshold is calibrated.

    Held-out rows, because inference meets rows the model did not train on: a run that repeats its
    rows fires more latents on new rows (planted wide set, 61 epochs: L0 7.7-8.3 on training chunks,
    10.6 on the held-out one, for k 8). Fixed rows, so a resumed run calibrates alike."""
    chunks, total = [], 0
    for c in (eval_chunks if len(eval_chunks) else train_chunks):
        if total >= rows:
            break
        chunks.append(c)
        start, stop = stores.chunk_range(c)
        total += stop - start
    for batch in eval_batches(stores, names, chunks, batch_size):
        yield {n: t.to(device).float() for n, t in batch.items()}


def make_optimizer(model: Crosscoder, lr: float):
    """Adam, fused where this torch build supports it for the model's device."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999))


@contextmanager
def deferred_interrupt():
    """Turn Ctrl-C and SIGTERM into a flag checked between steps, so the run can save a
    checkpoint at a step boundary before it stops. A second Ctrl-C stops at once."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.is_set():
            raise KeyboardInterrupt
        flag.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Metrics:
    """Sums of per-step values between two log lines (kept on the device: no sync per step)."""

    def __init__(self):
        self.sums, self.steps, self.tokens, self.started = {}, 0, 0, time.perf_counter()

    def add(self, parts: LossParts) -> None:
        values = {"loss": parts.loss, "recon": parts.recon, "sparsity": parts.sparsity, "aux": parts.aux,
                  "l0": parts.l0, **({"preact": parts.preact} if parts.preact is not None else {}),
                  **{f"err.{k}": v for k, v in parts.sq_err.items()},
                  **{f"var.{k}": v for k, v in parts.variance.items()}}
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0) + value.detach().float()
        self.steps += 1
        self.tokens += parts.tokens

    def record(self, names: list[str], comm: Comm = SINGLE, same_rows: bool = False) -> dict:
        """Averages since the last record, over all ranks (every rank must call it). Data-parallel,
        the ranks hold different rows; split over sources (`same_rows`), the same rows (L0 and the
        tokens are counted once) and the parts of the loss and errors of different sources."""
        keys = ["loss", "recon", "sparsity", "aux", "l0", *(f"{kind}.{n}" for kind in ("err", "var") for n in names),
                *(["preact"] if "preact" in self.sums else [])]
        once = same_rows and not comm.main
        values = [0.0 if k not in self.sums or (once and k == "l0") else self.sums[k] for k in keys]
        values.append(0.0 if once else float(self.tokens))
        device = self.sums["loss"].device
        totals = comm.sum(torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values]))
        avg = {k: float(v) for k, v in zip(keys, totals)}
        tokens = float(totals[-1])
        fvu = {n: avg[f"err.{n}"] / avg[f"var.{n}"] if avg[f"var.{n}"] > 0 else float("nan") for n in names}
        var_total = sum(avg[f"var.{n}"] for n in names)
        record = {k: avg[k] / self.steps for k in ("loss", "recon", "sparsity", "aux", "l0", "preact") if k in avg}
        record.update(fvu=fvu, fvu_total=sum(avg[f"err.{n}"] for n in names) / var_total if var_total else None,
                      tokens_per_s=tokens / max(time.perf_counter() - self.started, 1e-9))
        self.__init__()
        return record


def prepare_outputs(cfg: TrainConfig, stores: StoreSet, main: bool = True) -> bool:
    """Check the output, state and log paths; return True when a finished run makes this a no-op."""
    out, state = Path(cfg.output), state_path(cfg.output)
    if cfg.overwrite:  # replace only what xc wrote there, never a store this run reads
        for path, kind in ((out, "checkpoint"), (state, "file"), (cfg.log, "file")):
            if path:
                check_replaceable(path, kind, cfg.stores)
    if state.exists() and not cfg.resume and not cfg.overwrite:
        raise BadInput(f"found {str(state)!r} from an interrupted run; pass --resume to continue it "
                       f"or --overwrite to start over")
    check_output(out, overwrite=cfg.overwrite, resume=cfg.resume)
    if cfg.resume and out.exists():
        meta = read_metadata(out)
        if meta.get("training", {}).get("complete"):
            check_same_run(meta.get("hyperparameters", {}), cfg.hyperparameters(), out)
            if main:
                remove(state)  # left over when a run was killed just after its last checkpoint
            return True
        if not state.exists():
            raise BadInput(f"--resume: {str(out)!r} has no training state beside it "
                           f"({state.name}); pass --overwrite to start over")
    if cfg.log and not cfg.resume:
        check_output(cfg.log, overwrite=cfg.overwrite)
    return False


def open_log(cfg: TrainConfig, step: int):
    """The metrics file, fresh or (on resume) cut back to the lines before the resumed step."""
    if not cfg.log:
        return None
    path = Path(cfg.log)
    kept = []
    if cfg.resume and path.exists():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line torn by a kill
                pass
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    return path.open("a")


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of returning it to the OS.

    A CPU step allocates and frees tensors of tens of MB; glibc serves those with mmap
    and unmaps them on free, so every step page-faults all of them in again (about 15k
    faults a step at the benchmark shapes, 20% of its CPU time). PyTorch's CPU tuning
    guide suggests jemalloc or tcmalloc for the same reason; this needs neither."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks below 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):  # not glibc: leave the allocator alone
        pass


def train(cfg: TrainConfig, on_log: Callable[[dict], None] | None = None) -> Path:
    """Train a crosscoder as `cfg` says and return the checkpoint path.

    on_log receives every metrics record (the same dicts as the --log lines). Under
    torchrun, every rank runs this: data-parallel, or split over sources (xcli.crosscoder.source_parallel),
    with rank 0 writing the files.
    """
    stores = StoreSet(cfg.stores, allow_incomplete=cfg.allow_incomplete)
    cfg = resolve(cfg, stores)
    groups = None
    if cfg.split_sources and launched():  # checked before the ranks meet: a bad split stops every rank alike
        widths = {s.name: s.d for s in stores.sources if s.name in cfg.sources}
        groups = source_parallel.assign(widths, cfg.read, cfg.write, int(os.environ["WORLD_SIZE"]))
    if torch.device(cfg.device).type == "cpu":
        keep_freed_memory()
    with process_group(torch.device(cfg.device)) as comm, ExitStack() as held:
        quiet = console.settings.quiet
        console.settings.quiet = quiet or not comm.main  # one rank speaks
        try:  # rank 0 holds the output's lock for the run; if it cannot, every rank stops
            together(comm, (lambda: held.enter_context(output_lock(cfg.output))) if comm.main else None,
                     catching=BadInput)
            return run(cfg, stores, comm, on_log, groups)
        finally:
            console.settings.quiet = quiet


def run(cfg: TrainConfig, stores: StoreSet, comm: Comm, on_log: Callable[[dict], None] | None,
        groups: list[list[str]] | None = None) -> Path:
    """The training run of one process (one rank of a data-parallel run, or of a run split
    over sources: `groups`, the sources of each rank)."""
    finished = prepare_outputs(cfg, stores, comm.main)
    comm.barrier()  # every rank has checked the outputs before rank 0 starts writing
    if finished:
        console.info(f"{cfg.output} is already trained ({cfg.steps} steps)")
        return Path(cfg.output)
    device = local_device(torch.device(cfg.device))
    sources, host, shard = [s for s in stores.sources if s.name in cfg.sources], None, None
    if groups:  # model parallel: this rank's sources only; rank 0 keeps the whole crosscoder on the CPU
        shard = source_parallel.SourceShard(comm, groups, device, sources, cfg.latents, cfg.arch, cfg.k, cfg.read, cfg.write)
        host = build_model(cfg, stores) if comm.main else None
        model = shard.local_model(host)
    else:
        model = build_model(cfg, stores).to(device)
    dp = SINGLE if shard else comm  # the data-parallel ranks
    opt = make_optimizer(model, cfg.lr)
    loss_fn = TrainingLoss(model)
    if dp.world > 1:  # gradients summed over ranks as they are produced
        loss_fn = torch.nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device] if device.type == "cuda" else None, **no_buffer_sync())
    state = TrainState(since_fired=torch.zeros(cfg.latents, dtype=torch.int64, device=device))
    last_saved = None
    if cfg.resume and state_path(cfg.output).exists():
        if shard:  # rank 0 reads the whole state into its host copy and hands out the slices
            payload = read_state(state_path(cfg.output), cfg, stores, mmap=True)
            if host is not None:
                host.load_state_dict(payload["model"])
            shard.load_model(model, host)
            shard.load_optimizer(opt, model, payload["optimizer"])
            state = train_state(payload, device)
            del payload
        else:
            state = load_state(state_path(cfg.output), model, opt, cfg, stores, device)
        last_saved = state.step
        console.info(f"resuming at step {state.step} of {cfg.steps}")
    elif cfg.overwrite and comm.main:
        remove(state_path(cfg.output))
    train_chunks, eval_chunks = stores.hold_out(cfg.eval_fraction)
    names = [s.name for s in model.sources]  # split: this rank's sources of the same rows
    stream = BatchStream(stores, names, train_chunks, cfg.batch_size, cfg.seed, cfg.shuffle_buffer,
                         pin_memory=device.type == "cuda", rank=dp.rank, world=dp.world)
    console.info(f"training a {cfg.arch} crosscoder: {cfg.latents} latents, reads {', '.join(cfg.read)}, "
                 f"writes {', '.join(cfg.write)}; {cfg.steps} steps of {cfg.batch_size} tokens "
                 f"({stream.rows_per_epoch} training rows per epoch, {len(eval_chunks)} held-out chunks)"
                 + (f"; {dp.world} data-parallel ranks" if dp.world > 1 else "")
                 + (f"; sources split over {comm.world} ranks: " + "; ".join(", ".join(g) for g in groups)
                    if shard else ""))
    log = open_log(cfg, state.step) if comm.main else None

    def emit(record: dict) -> None:
        if log:
            log.write(strict_json.dumps(record) + "\n")
            log.flush()
        if on_log and comm.main:
            on_log(record)

    warned_divergence = False

    def checkpoint(complete: bool, with_eval: bool = True) -> None:
        """Rank 0 evaluates and writes; the other ranks go on and wait for it at the next collective.
        Split over sources, every rank evaluates its sources and sends them to rank 0's host copy."""
        nonlocal last_saved, warned_divergence
        stop_on_nonfinite_weights(model, state, cfg, last_saved, comm, device)  # before anything is written
        previous_fvu = (state.last_eval or {}).get("fvu_total")
        last_saved = state.step
        if with_eval and cfg.activation == "batchtopk":  # every rank: split over sources it is a collective
            model.calibrate_threshold(calibration_batches(stores, names, train_chunks, eval_chunks, cfg.batch_size,
                                                               device))
        optimizer_state = None
        if shard:
            if with_eval:
                rows = eval_batches(stores, [s.name for s in model.sources], eval_chunks, cfg.batch_size)
                state.last_eval = source_parallel.held_out_metrics(model, rows, device, list(cfg.write))
            shard.gather_model(model, host)
            optimizer_state = None if complete else shard.gather_optimizer(opt, model, host)
        if not comm.main:
            return
        if with_eval and not shard:  # skipped when saving on Ctrl-C, so that stopping is quick
            # in float32, as consumers (xcli.load, xc eval) run the model, whatever --dtype trained it
            state.last_eval = held_out_metrics(model, stores, eval_chunks, cfg.batch_size, device, "float32")
        if with_eval and state.last_eval:
            emit({"kind": "eval", "step": state.step, "tokens": state.tokens, **state.last_eval})
            fvu = state.last_eval.get("fvu_total")
            # A fresh wide dictionary starts above 1 (each unit-norm decoder adds its own noise): warn only when
            # the error grows between evaluations, or when the finished run is still worse than the mean.
            rising = previous_fvu is not None and fvu is not None and fvu > previous_fvu
            if fvu is not None and fvu > 1 and (rising or complete) and not warned_divergence:
                warned_divergence = True
                console.warn(f"held-out FVU is {fvu:.4g} at step {state.step}: worse than predicting the mean; "
                             f"training may be diverging (lower --lr)")
        whole = host if shard else model
        if not complete:
            save_state(state_path(cfg.output), whole, optimizer_state if shard else opt.state_dict(), cfg, stores, state)
        write_checkpoint(whole, cfg, stores, state, complete)

    metrics = Metrics()
    bar = console.progress(total=cfg.steps, initial=state.step, desc="train", unit="step")
    try:
        with stream.prefetched(state.position) as batches, deferred_interrupt() as interrupted:
            waited = 0.0  # the loader's waits up to the last metrics line
            while state.step < cfg.steps:
                batch = next(batches)
                x = {n: t.to(device, non_blocking=True).float() for n, t in batch.data.items()}
                parts = train_step(model, opt, x, state, cfg, last_saved, loss_fn, batch.rows, dp, batch.index)
                state.position = batch.after
                metrics.add(parts)
                bar.update(1)
                if state.step % cfg.log_every == 0 or state.step == cfg.steps:
                    state.last_train = metrics.record(list(cfg.write), comm, same_rows=shard is not None)
                    state.last_train["dead_fraction"] = float((state.since_fired >= cfg.dead_tokens).float().mean())
                    record = {"kind": "train", "step": state.step, "tokens": state.tokens,
                              "epoch": state.tokens / stream.rows_per_epoch, **state.last_train,
                              "lr": lr_at(state.step - 1, cfg), "loader_wait_s": batches.waited - waited}
                    waited = batches.waited
                    if cfg.activation == "relu":
                        record["l1"] = l1_at(state.step - 1, cfg)
                    if cfg.activation == "jumprelu":
                        record["tanh_penalty"] = sparsity_at(state.step - 1, cfg)
                    if cfg.activation == "batchtopk":
                        record["threshold"] = float(model.threshold)
                    emit(record)
                    bar.set_postfix(loss=f"{record['loss']:.4g}", l0=f"{record['l0']:.1f}")
                stop = comm.any(interrupted.is_set(), device)  # every rank stops at the same step
                if state.step < cfg.steps and state.step % cfg.checkpoint_every == 0:
                    checkpoint(complete=False)
                elif state.step < cfg.steps and stop:
                    checkpoint(complete=False, with_eval=False)
                if stop and state.step < cfg.steps:
                    comm.barrier()  # under torchrun, a rank that exits makes the others stop: save first
                    console.warn(f"interrupted at step {state.step}; continue with --resume")
                    raise KeyboardInterrupt
        checkpoint(complete=True)
        if comm.main:
            remove(state_path(cfg.output))
        comm.barrier()
    finally:
        bar.close()
        if log:
            log.close()
    return Path(cfg.output)


def no_buffer_sync() -> dict:
    """DDP need not copy the buffers (scales, threshold) every step: every rank updates them alike."""
    parameters = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in parameters else {"broadcast_buffers": False}


def train_step(model: Crosscoder, opt, x: dict[str, Tensor], state: TrainState, cfg: TrainConfig,
               last_saved: int | None, loss_fn: Callable[..., LossParts] | None = None,
               batch_rows: int | None = None, comm: Comm = SINGLE, index=None) -> LossParts:
    """One optimiser step on one batch; updates the step count, dead-latent counters and threshold.

    Data-parallel, x is this rank's share of a batch of `batch_rows` rows (at places `index`
    of the whole batch) and `loss_fn` the DDP-wrapped TrainingLoss; the ranks agree on which
    latents fired and on stopping."""
    loss_fn = loss_fn or TrainingLoss(model)
    for group in opt.param_groups:
        group["lr"] = lr_at(state.step, cfg)
    dead = state.since_fired >= cfg.dead_tokens
    x_in = None
    if cfg.mask_prob:  # stochastic layer masking (xcli/fmx.py): the encoder reads x_in, the loss targets x
        rows = batch_rows or x[model.read[0]].shape[0]
        keep = fmx.layer_keep(rows, len(model.read), cfg.mask_prob, cfg.seed, state.step)
        if index is not None:  # data-parallel: this rank's rows of the whole batch's mask
            keep = keep[torch.as_tensor(index)]
        x_in = fmx.mask_layers(x, model.read, keep)
    with autocast(next(model.parameters()).device, cfg.dtype):
        parts = loss_fn(x, sparsity_at(state.step, cfg), dead, cfg.k_aux, x_in, batch_rows, comm)
    opt.zero_grad(set_to_none=True)
    (parts.loss * comm.world).backward()  # DDP averages over ranks; the parts already add up to the batch loss
    if model.partition:  # tied decoder rows: one gradient; dedicated rows: none for other models
        model.partition.fix_gradients(model)
    if model.source_comm.world > 1:  # split over sources: the norm of the whole crosscoder
        grad_norm = source_parallel.clip_grad_norm(model, cfg.clip or float("inf"))
    else:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
    finite, fired = torch.isfinite(parts.loss) & torch.isfinite(grad_norm), parts.fired
    if model.source_comm.world > 1:  # the ranks hold different parts of the loss
        finite = model.source_comm.sum((~finite).float()[None])[0] == 0
    if comm.world > 1:
        agreed = comm.sum(torch.cat([fired.float(), (~finite).float()[None]]))
        fired, finite = agreed[:-1] > 0, agreed[-1] == 0
    if not bool(finite):  # before Adam: weights stay good
        stop_on_nonfinite(parts.loss, grad_norm, state, cfg, last_saved)
    opt.step()
    if model.partition:
        model.partition.enforce(model)
    with torch.no_grad():
        rows = batch_rows or parts.tokens
        state.since_fired = torch.where(fired, 0, state.since_fired + rows)
        if cfg.activation == "batchtopk" and state.step >= cfg.warmup:
            state.threshold_updates += 1
            model.update_threshold(parts.min_score, threshold_decay(state.threshold_updates))
    state.step += 1
    state.tokens += rows
    return parts


def stop_on_nonfinite_weights(model: Crosscoder, state: TrainState, cfg: TrainConfig, last_saved: int | None,
                              comm: Comm, device: torch.device) -> None:
    """No checkpoint or state holds a NaN or inf: an optimizer step with finite gradients can still make
    them (a huge --lr). Every rank checks its parameters; all stop together."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if not comm.any(bool(bad), device):
        return
    kept = (f"the last good checkpoint (step {last_saved}) is kept at {cfg.output}" if last_saved is not None
            else "no checkpoint had been written yet")
    raise XcError(f"the weights became non-finite ({', '.join(bad[:3]) or 'on another rank'}) by step {state.step}: "
                  f"training stopped; {kept}. Lower --lr")


def stop_on_nonfinite(loss: Tensor, grad_norm: Tensor, state: TrainState, cfg: TrainConfig,
                      last_saved: int | None):
    loss, grad_norm = float(loss.detach()), float(grad_norm)
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    kept = (f"the last good checkpoint (step {last_saved}) is kept at {cfg.output}" if last_saved is not None
            else f"no checkpoint had been written yet (the first was due at step {cfg.checkpoint_every})")
    raise XcError(f"{what} at step {state.step + 1}: training stopped; {kept}. "
                  f"Lower --lr or check the store for non-finite activations")
