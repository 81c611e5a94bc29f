"""JumpReLU crosscoders: a learned threshold per latent (Anthropic's January 2025 training update).

    h      = Σ_s (x_s * scale_s) @ W_enc^s + b_enc                      pre-activations (B, F)
    θ_i    = exp(t_i)                                                   t: the trained log-threshold
    f_i    = h_i · 1[h_i > θ_i]                                         JumpReLU

The step has no useful gradient, so training uses a straight-through estimator with a
rectangle kernel of width ε (the bandwidth), K(u) = 1[|u| < 1/2] (Rajamanoharan et al. 2024):

    ∂f_i/∂θ_i = -(θ_i/ε) K((h_i - θ_i)/ε)
    ∂f_i/∂h_i = 1[h_i > θ_i] + (θ_i/ε) K((h_i - θ_i)/ε)

The second term of ∂f/∂h passes the estimator on to the encoder as well, as Anthropic's update
does (DeepMind's original sends it to the threshold only; SAELens calls the switch
`jumprelu_ste_to_input`). The loss (all in normalised units, ||d_i|| = Σ_s ||W_dec,i^s||):

    recon    = Σ_s mean_b ||x_s - x̂_s||²
    sparsity = λ_s(t) · mean_b Σ_i tanh(c · f_i · ||d_i||)        λ_s rises linearly from 0 over the run
    preact   = λ_p · mean_b Σ_i ReLU(θ_i - h_i) · ||d_i||          on the pre-activations h, as the paper
                                                                 writes it (crosscode feeds it the
                                                                 post-JumpReLU latents instead)

The pre-activation loss pulls every latent's pre-activation up toward its threshold, which
keeps latents from dying; it replaces AuxK here.

Defaults (`DEFAULT_*`, from xcli.crosscoder.config) are Anthropic's, as the crosscode trainer records them
(oli-clive-griffin/model-diffing, crosscode/trainers/jan_update_crosscoder/config.py):
c = 4, final λ_s = 20, λ_p = 3e-6, ε = 2.0, log-threshold 0.1 at the start (θ = e^0.1, not 0.1).
Their units are ours: inputs scaled so that the mean squared norm is d (Anthropic's April 2024
update), summed squared errors.
"""

import math

import torch
from torch import Tensor

from xcli.crosscoder import config

DEFAULT_TANH_PENALTY = config.JUMPRELU_TANH_PENALTY      # λ_s at the end of the run
DEFAULT_TANH_SCALE = config.JUMPRELU_TANH_SCALE          # c
DEFAULT_PREACT_PENALTY = config.JUMPRELU_PREACT_PENALTY  # λ_p
DEFAULT_BANDWIDTH = config.JUMPRELU_BANDWIDTH            # ε
DEFAULT_INITIAL_THRESHOLD = math.exp(config.JUMPRELU_LOG_THRESHOLD)  # θ at the start


def rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """f = h · 1[h > θ] with the straight-through estimator described in the module docstring."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        ste = (threshold / ctx.bandwidth) * rectangle((pre - threshold) / ctx.bandwidth) * grad
        grad_pre = (pre > threshold) * grad + ste
        grad_threshold = -ste.sum(dim=tuple(range(ste.dim() - threshold.dim())))
        return grad_pre, grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float = DEFAULT_BANDWIDTH) -> Tensor:
    """JumpReLU of pre-activations (B, F) with per-latent thresholds (F,); differentiable in both
    through the straight-through estimator when either needs a gradient."""
    if torch.is_grad_enabled() and (pre.requires_grad or threshold.requires_grad):
        return _JumpReLU.apply(pre, threshold.to(pre.dtype), bandwidth)
    return pre * (pre > threshold)


def tanh_penalty(f: Tensor, norm_sum: Tensor, scale: float) -> Tensor:
    """Σ_i tanh(c · f_i · ||d_i||) summed over the batch (divide by the batch size for the mean)."""
    return torch.tanh(scale * f.float() * norm_sum).sum()


def preact_penalty(pre: Tensor, threshold: Tensor, norm_sum: Tensor) -> Tensor:
    """Σ_i ReLU(θ_i - h_i) · ||d_i|| summed over the batch."""
    return (torch.relu(threshold - pre.float()) * norm_sum).sum()


def tanh_penalty_at(step: int, steps: int, final: float) -> float:
    """λ_s(t): rises linearly from 0 to `final` over the whole run (Anthropic, January 2025)."""
    return final * min(1.0, (step + 1) / max(1, steps))


# -- BatchTopK -> JumpReLU ----------------------------------------------------------------------------------

NEVER_FIRES = 3.0e38
"""The threshold of a latent the BatchTopK model never selected on the calibration rows (finite in float32)."""


@torch.no_grad()
def selected_minima(model, batches) -> Tensor:
    """Per latent, the smallest pre-activation h_i that BatchTopK's training selection (the k·B best
    scores of each batch) kept over `batches` (dicts of raw activations); inf where it kept none."""
    theta = torch.full((model.n_latents,), math.inf, device=model.b_enc.device)
    for x in batches:
        pre = model.pre_activations(x).float()
        kept = model.activate(pre, batch_select=True) != 0
        theta = torch.minimum(theta, torch.where(kept, pre, math.inf).amin(dim=0))
    return theta


@torch.no_grad()
def l0_scale(model, batches, theta: Tensor, target_l0: float, candidates: int = 4) -> float:
    """The factor a such that thresholds a·θ fire `target_l0` latents per row on average over `batches`.

    A pair (row, latent) fires when h_i > a·θ_i, i.e. when h_i/θ_i > a: a is the (target·N+1)-th
    largest ratio over the N rows, found exactly from each batch's `candidates`·target·B largest
    ratios (as the BatchTopK threshold is calibrated). Latents with θ_i = inf never fire."""
    kept, rows = [], 0
    for x in batches:
        pre = model.pre_activations(x).float()
        ratio = torch.where(torch.isfinite(theta) & (pre > 0), pre / theta.clamp_min(1e-30), 0.0)
        want = min(ratio.numel(), math.ceil(candidates * target_l0 * len(pre)))
        kept.append(ratio.flatten().topk(want).values)
        rows += len(pre)
    values = torch.cat(kept)
    want = round(target_l0 * rows)
    return float(values.topk(want + 1).values[-1]) if values.numel() > want else 0.0

