"""The sparse training path of TopK and BatchTopK crosscoders.

Only the encoder matmul is dense. Everything after the selection works on the
N selected (token b, latent i) pairs, with v_n = f at pair n and g_s = dL/dx̂_s:

    x̂_s[b]          = Σ_{n: b_n = b} v_n · W_dec^s[i_n]  (+ b_dec^s)      embedding bag over tokens
    dW_dec^s[i]     = Σ_{n: i_n = i} v_n · g_s[b_n]                       embedding bag over latents
    dv_n            = Σ_s ⟨g_s[b_n], W_dec^s[i_n]⟩                        matmul sampled at the pairs
    dpre_n          = dv_n · [pre_n > 0]                                   ReLU
    db_enc[i]       = Σ_{n: i_n = i} dpre_n
    dW_enc^s[:, i]  = Σ_{n: i_n = i} dpre_n · x_s[b_n]                    embedding bag over latents

so a training step costs one dense B×D×F matmul plus O(N·D), instead of five
dense matmuls (Gao et al. 2024, appendix D.2; EleutherAI/sparsify). The O(N·D)
products go through `embedding_bag` and `sampled_dot`: Triton kernels
(xcli/kernels.py) for CUDA tensors when triton imports and XC_DISABLE_TRITON=1 is
not set, PyTorch otherwise (the CPU path and the reference). Tests check both
against the dense computation in `Crosscoder.forward`. A decoder held as two factors
(fmxcoders, xcli/crosscoder/fmx.py) decodes through `decode_low_rank`, whose backward sends
the gradient to the factors without a dense dW_dec.
"""

import os
import warnings
from functools import cache, cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from xcli.distributed import SINGLE, Comm

ENCODER_GRAD = "sparse"
"""How dW_enc is formed: "sparse" (embedding bag over latents, O(N·D)) or "dense"
(x^T @ scattered dpre, one more B×D×F matmul, in bf16 when the forward was). Sparse
was faster on every CPU measured (benchmarks/train_speed.py --encoder-grad)."""


@cache
def _kernels():
    try:
        from xcli.crosscoder import kernels
    except ImportError:  # no triton (CPU builds of torch)
        return None
    return kernels


def use_triton(t: Tensor) -> bool:
    return t.is_cuda and os.environ.get("XC_DISABLE_TRITON") != "1" and _kernels() is not None


def embedding_bag(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """(len(offsets), d): row j = Σ over items m of bag j of weights_m · table[index_m]."""
    if use_triton(table):
        return _kernels().embedding_bag(index, table, offsets, weights)
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype))


class Pairs:
    """Selected (token, latent) pairs of a batch, sorted by token, then latent."""

    def __init__(self, rows: Tensor, cols: Tensor, n_rows: int, n_latents: int):
        self.rows, self.cols, self.n_rows, self.n_latents = rows, cols, n_rows, n_latents

    @classmethod
    def from_flat(cls, flat: Tensor, n_rows: int, n_latents: int) -> "Pairs":
        """From flat indices row * F + latent, in any order."""
        flat = flat.sort().values
        return cls(flat // n_latents, flat % n_latents, n_rows, n_latents)

    @classmethod
    def per_row(cls, cols: Tensor, n_latents: int) -> "Pairs":
        """From a (B, k) matrix of latent indices, k per token."""
        n_rows, k = cols.shape
        rows = torch.arange(n_rows, device=cols.device).repeat_interleave(k)
        return cls(rows, cols.sort(dim=1).values.flatten(), n_rows, n_latents)

    def __len__(self) -> int:
        return self.rows.numel()

    @cached_property
    def row_counts(self) -> Tensor:
        return torch.bincount(self.rows, minlength=self.n_rows)

    @cached_property
    def row_offsets(self) -> Tensor:
        """Where each token's pairs start (the bags of the decoder's embedding bag)."""
        return self.row_counts.cumsum(0) - self.row_counts

    @cached_property
    def by_latent(self) -> tuple[Tensor, Tensor, Tensor]:
        """(order, rows in that order, offsets): the pairs sorted by latent, for the backward bags."""
        _, order = self.cols.sort(stable=True)  # (argsort(stable=True) is 1000x slower on CPU)
        counts = self.latent_counts
        return order, self.rows[order], counts.cumsum(0) - counts

    @cached_property
    def latent_counts(self) -> Tensor:
        """(F,) how many pairs each latent has."""
        return torch.bincount(self.cols, minlength=self.n_latents)

    @cached_property
    def pattern(self) -> Tensor:
        """The pairs as a (B, F) sparse CSR pattern (values unused) for sampled matmuls."""
        crow = torch.cat([self.row_counts.new_zeros(1), self.row_counts.cumsum(0)])
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, self.cols, torch.zeros(len(self), device=self.rows.device),
                                           (self.n_rows, self.n_latents), check_invariants=False)

    def dense(self, values: Tensor) -> Tensor:
        """The (B, F) matrix that holds `values` at the pairs and zeros elsewhere."""
        out = values.new_zeros(self.n_rows, self.n_latents)
        return out.index_put((self.rows, self.cols), values)

    def sum_by_latent(self, values: Tensor) -> Tensor:
        """(F,) sums of per-pair values by latent."""
        return values.new_zeros(self.n_latents).index_add_(0, self.cols, values)

    def bag_by_latent(self, table: Tensor, weights: Tensor) -> Tensor:
        """(F, d): row i = Σ_{n: i_n = i} weights_n · table[b_n]."""
        order, rows, offsets = self.by_latent
        return embedding_bag(rows, table, offsets, weights[order])

    def gather(self, matrix: Tensor) -> Tensor:
        """(N,) entries of a (B, F) matrix at the pairs."""
        return matrix[self.rows, self.cols]

    def sampled_dot(self, a: Tensor, b: Tensor) -> Tensor:
        """(N,) float32 (a @ b.T) at the pairs, for a (B, d) and b (F, d), without forming a @ b.T."""
        if use_triton(a):
            return _kernels().sampled_dot(self.rows, self.cols, a, b)
        return torch.sparse.sampled_addmm(self.pattern.to(b.dtype), a, b.T, beta=0.0).values().float()


# -- selection --------------------------------------------------------------------------

def select_topk(score: Tensor, k: int) -> Pairs:
    """The k highest scores of every token."""
    return Pairs.per_row(score.topk(k, dim=1, sorted=False).indices, score.shape[1])


def select_above(score: Tensor, threshold: Tensor) -> Pairs:
    """Every pair whose score exceeds a threshold (BatchTopK at inference)."""
    rows, cols = (score > threshold).nonzero(as_tuple=True)
    return Pairs(rows, cols, score.shape[0], score.shape[1])


def kth_largest(values: Tensor, k: int) -> Tensor:
    return values.topk(k, sorted=False).values.min()


def select_batchtopk(score: Tensor, k: int, candidates: int | None = None, batch_rows: int | None = None,
                     comm: Comm = SINGLE) -> tuple[Pairs, Tensor]:
    """The k·B highest positive scores of the batch, without a top-k over all B·F entries.

    Each token first proposes its c = 2k best scores, and t = the (k·B)-th largest
    proposal. A score outside its token's proposals is at most that token's c-th
    best, r_b; when r_b < t it cannot reach the batch's top k·B (the proposals
    already hold k·B scores >= t), so only tokens with r_b >= t ("saturated") are
    searched in full, and t is recomputed over the proposals plus those full rows
    (only scores >= t can matter, since t can only rise). The union holds the whole
    batch top k·B, so the result is exact (ties at the threshold may keep a few more).

    Data-parallel (`comm` over several ranks, each holding `score` rows of a batch of
    `batch_rows`): the proposals are gathered from every rank, so all ranks find the
    same threshold and the selection is that of the whole batch in one process.
    Returns this rank's pairs and the smallest kept score of the whole batch.
    """
    n_rows, n_latents = score.shape
    keep = k * (batch_rows or n_rows)
    c = min(n_latents, candidates or 2 * k)
    top = score.topk(c, dim=1, sorted=False)
    t = kth_largest(comm.cat(top.values.flatten()), keep)
    low = top.values.min(dim=1).values if n_rows else score.new_zeros(0)
    saturated = (low >= t) & (low > 0) if c < n_latents else torch.zeros_like(low, dtype=torch.bool)
    extra = score.new_zeros(0, dtype=torch.long)
    if comm.any(bool(saturated.any()), score.device):
        full = score[saturated]
        proposed = top.values[~saturated].flatten()
        t = kth_largest(comm.cat(torch.cat([proposed[proposed >= t], full[full >= t]])), keep)
        r, i = ((full >= t) & (full > 0)).nonzero(as_tuple=True)
        extra = saturated.nonzero().squeeze(1)[r] * n_latents + i
    chosen = (top.values >= t) & (top.values > 0) & ~saturated[:, None]
    r, j = chosen.nonzero(as_tuple=True)
    pairs = Pairs.from_flat(torch.cat([r * n_latents + top.indices[r, j], extra]), n_rows, n_latents)
    if t > 0:  # the threshold is itself a kept score
        return pairs, t
    kept = pairs.gather(score)  # fewer than k·B positive scores: all of them are kept
    smallest = comm.min(kept.min()[None] if len(pairs) else score.new_full((1,), float("inf")))[0]
    return pairs, torch.where(torch.isinf(smallest), 0.0, smallest).to(score.dtype)


# -- the encoder ------------------------------------------------------------------------

def encoder_matmul(xs: list[Tensor], weights: list[Tensor], dtype: torch.dtype) -> Tensor:
    """Σ_s xs[s] @ weights[s], (B, F), in `dtype` (bf16: one matmul over the concatenated sources)."""
    if dtype == torch.float32 or len(xs) == 1:
        out = xs[0].to(dtype) @ weights[0].to(dtype)
        for x, w in zip(xs[1:], weights[1:]):
            out.addmm_(x.to(dtype), w.to(dtype))
        return out
    x_cat = torch.cat([x.to(dtype) for x in xs], dim=1)
    w_cat = torch.empty(x_cat.shape[1], weights[0].shape[1], dtype=dtype, device=x_cat.device)
    start = 0
    for w in weights:  # cast while copying: one pass over the weights
        w_cat[start:start + w.shape[0]].copy_(w.detach())
        start += w.shape[0]
    return x_cat @ w_cat


class _EncoderAt(torch.autograd.Function):
    """f at the pairs = ReLU(pre at the pairs), with the encoder gradients formed at the pairs only.

    The inputs get a gradient too when they require one (an fmxcoder's inputs are its batch
    contracted with the encoder's basis, xcli/crosscoder/fmx.py): dx_s[b] = Σ_{n: b_n = b} dpre_n · W_s[:, i_n]."""

    @staticmethod
    def forward(ctx, pairs: Pairs, pre_at: Tensor, compute_dtype: torch.dtype, n_inputs: int,
                b_enc: Tensor, *inputs_and_weights: Tensor) -> Tensor:
        ctx.pairs, ctx.compute_dtype, ctx.n_inputs = pairs, compute_dtype, n_inputs
        ctx.xs, ctx.weights = inputs_and_weights[:n_inputs], inputs_and_weights[n_inputs:]
        ctx.save_for_backward(pre_at > 0)
        return torch.relu(pre_at)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (active,) = ctx.saved_tensors
        pairs, xs, n = ctx.pairs, ctx.xs, ctx.n_inputs
        dpre = grad * active
        db_enc = pairs.sum_by_latent(dpre) if ctx.needs_input_grad[4] else None
        dxs = [embedding_bag(pairs.cols, w.detach().T.contiguous(), pairs.row_offsets, dpre) if needed else None
               for w, needed in zip(ctx.weights, ctx.needs_input_grad[5:5 + n])]
        if ENCODER_GRAD == "dense":
            dense = pairs.dense(dpre.to(ctx.compute_dtype))
            dws = [(x.detach().to(ctx.compute_dtype).T @ dense).float() for x in xs]
        else:  # (d, F): the parameter's layout; a transposed view (fmx's latent factor) keeps its own
            dws = [pairs.bag_by_latent(x.detach(), dpre).T for x in xs]
            dws = [dw.contiguous() if w.is_contiguous() else dw for dw, w in zip(dws, ctx.weights)]
        dws = [dw if needed else None for dw, needed in zip(dws, ctx.needs_input_grad[5 + n:])]
        return None, None, None, None, db_enc, *dxs, *dws


def encoder_values(pairs: Pairs, pre_at: Tensor, xs: list[Tensor], b_enc: Tensor, weights: list[Tensor],
                   compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """(N,) latent values ReLU(pre) at the pairs, differentiable in b_enc, the encoder weights and
    the inputs that require a gradient.

    pre_at must be Σ_s xs[s] @ weights[s] + b_enc at the pairs (computed without grad)."""
    return _EncoderAt.apply(pairs, pre_at.float(), compute_dtype, len(xs), b_enc, *xs, *weights)


# -- the decoder ------------------------------------------------------------------------

class _Decode(torch.autograd.Function):
    """Per written source, (B, d_s) = Σ over a token's pairs of v · W_dec^s[latent]."""

    @staticmethod
    def forward(ctx, pairs: Pairs, values: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        ctx.pairs = pairs
        ctx.save_for_backward(values, *weights)
        return tuple(embedding_bag(pairs.cols, w, pairs.row_offsets, values) for w in weights)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        values, *weights = ctx.saved_tensors
        pairs = ctx.pairs
        dvalues = torch.zeros_like(values) if ctx.needs_input_grad[1] else None
        dweights = []
        for g, w, needed in zip(grads, weights, ctx.needs_input_grad[2:]):
            if g is None:
                dweights.append(None)
                continue
            g = g.to(w.dtype).contiguous()
            if dvalues is not None:  # dv_n = ⟨g[b_n], W[i_n]⟩, only at the pairs
                dvalues += pairs.sampled_dot(g, w)
            dweights.append(pairs.bag_by_latent(g, values) if needed else None)
        return None, dvalues, *dweights


def decode(pairs: Pairs, values: Tensor, weights: list[Tensor]) -> list[Tensor]:
    """Reconstructions (without bias), one (B, d_s) per decoder weight (F, d_s)."""
    with torch.autocast(values.device.type, enabled=False):
        return list(_Decode.apply(pairs, values.float(), *weights))


class _DecodeLowRank(torch.autograd.Function):
    """(B, D) = Σ over a token's pairs of v · W[latent] for a decoder W = latent @ basis.T of rank R,
    given also as `table` (F, D), computed without grad (it serves the selection's norms anyway).

    The backward reaches the factors without a dense (F, D) gradient of W: with g = dL/dx̂,

        dv_n       = ⟨g[b_n] @ basis, latent[i_n]⟩
        dlatent[i] = Σ_{n: i_n = i} v_n · (g[b_n] @ basis)
        dbasis     = g.T @ h,   h[b] = Σ_{n: b_n = b} v_n · latent[i_n]

    which costs 2·B·D·R; when fewer than B latents are used (AuxK's dead latents), the same through
    their rows of dW (2·u·D·R for u latents) instead."""

    @staticmethod
    def forward(ctx, pairs: Pairs, values: Tensor, table: Tensor, basis: Tensor, latent: Tensor) -> Tensor:
        ctx.pairs = pairs
        ctx.save_for_backward(values, table, basis, latent)
        return embedding_bag(pairs.cols, table, pairs.row_offsets, values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        values, table, basis, latent = ctx.saved_tensors
        pairs = ctx.pairs
        g = g.to(basis.dtype).contiguous()
        used = pairs.latent_counts.nonzero().squeeze(1)
        if len(used) < pairs.n_rows:  # few latents: through their rows of dW = Σ_n v_n · g[b_n]
            dw = pairs.bag_by_latent(g, values)[used]  # (u, D)
            dlatent = latent.new_zeros(latent.shape).index_copy_(0, used, dw @ basis)
            dbasis = dw.T @ latent[used]
            dvalues = pairs.sampled_dot(g, table)
        else:
            dh = g @ basis  # (B, R)
            dvalues = pairs.sampled_dot(dh, latent)
            dlatent = pairs.bag_by_latent(dh, values)
            dbasis = g.T @ embedding_bag(pairs.cols, latent, pairs.row_offsets, values)
        return (None, dvalues if ctx.needs_input_grad[1] else None, None,
                dbasis if ctx.needs_input_grad[3] else None, dlatent if ctx.needs_input_grad[4] else None)


def decode_low_rank(pairs: Pairs, values: Tensor, table: Tensor, basis: Tensor, latent: Tensor) -> Tensor:
    """The reconstruction (B, D) without bias from the decoder W = latent @ basis.T (F, D), which
    `table` holds computed; differentiable in the values and the two factors (_DecodeLowRank)."""
    with torch.autocast(values.device.type, enabled=False):
        return _DecodeLowRank.apply(pairs, values.float(), table, basis, latent)
