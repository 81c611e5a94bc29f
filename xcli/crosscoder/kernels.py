"""Triton kernels for the sparse training path (xcli/sparse.py) on CUDA.

Two kernels cover the O(N·d) products of a step over the N selected (token, latent) pairs:

    embedding_bag   out[j] = Σ_{m in bag j} w_m · table[index_m]
                    the decoder forward (bags = tokens, table = W_dec) and the weight
                    gradients dW_dec, dW_enc (bags = latents, table = g or x)
    sampled_dot     out_n = ⟨a[rows_n], b[cols_n]⟩
                    the latent-value gradient dv_n = ⟨g[b_n], W_dec[i_n]⟩

Inputs may be float32 or bfloat16; products are summed in float32, and a bfloat16 result is
rounded once at the end. Each bag is reduced by
one program per block of columns, BLOCK_M items at a time, so no output is written twice:
no atomics, and the result does not depend on scheduling. (OpenAI's sparse_autoencoder
scatters with atomics; EleutherAI's sparsify, after xformers, builds an inverse index; the
pairs here come already sorted by token and by latent, `Pairs.by_latent`.)

On CPU, the Triton interpreter runs these kernels on CPU tensors (tests/crosscoder/test_kernels.py);
xcli/sparse.py uses them only for CUDA tensors.
"""

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _bag_kernel(out, table, index, weight, offsets, n_items, d, stride_out, stride_table,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    bag = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1, mask=bag + 1 < tl.num_programs(0), other=n_items)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = m < end
        rows = tl.load(index + m, mask=ok, other=0).to(tl.int64)
        w = tl.load(weight + m, mask=ok, other=0.0).to(tl.float32)
        tile = tl.load(table + rows[:, None] * stride_table + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * w[:, None], axis=0)
    tl.store(out + bag.to(tl.int64) * stride_out + cols, acc, mask=col_ok)


@triton.jit
def _dot_kernel(out, a, b, rows, cols, n, d, stride_a, stride_b, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = pairs < n
    r = tl.load(rows + pairs, mask=ok, other=0).to(tl.int64)
    c = tl.load(cols + pairs, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        mask = ok[:, None] & (k < d)[None, :]
        x = tl.load(a + r[:, None] * stride_a + k[None, :], mask=mask, other=0.0).to(tl.float32)
        y = tl.load(b + c[:, None] * stride_b + k[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)
    tl.store(out + pairs, acc, mask=ok)


def _rows_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(max(d, 16)))


def embedding_bag(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor) -> Tensor:
    """`F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights)`:
    (len(offsets), d) in table's dtype, bag j = items offsets[j] .. offsets[j + 1] (the last to the end)."""
    table = _rows_contiguous(table)
    n_bags, d = offsets.numel(), table.shape[1]
    out = torch.empty(n_bags, d, dtype=torch.float32, device=table.device)
    if n_bags and d:
        block_d = _block_d(d)
        with torch.cuda.device_of(table):
            _bag_kernel[(n_bags, triton.cdiv(d, block_d))](
                out, table, index, weights, offsets, index.numel(), d, out.stride(0), table.stride(0),
                BLOCK_M=16, BLOCK_D=block_d)
    return out.to(table.dtype)  # rounded once, by torch (the interpreter's bf16 cast truncates)


def sampled_dot(rows: Tensor, cols: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """(N,) float32 ⟨a[rows_n], b[cols_n]⟩: the product a @ b.T at the pairs."""
    a, b = _rows_contiguous(a), _rows_contiguous(b)
    n, d = rows.numel(), a.shape[1]
    if n == 0 or d == 0:
        return torch.zeros(n, dtype=torch.float32, device=a.device)
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    with torch.cuda.device_of(a):
        _dot_kernel[(triton.cdiv(n, 32),)](out, a, b, rows, cols, n, d, a.stride(0), b.stride(0),
                                           BLOCK_N=32, BLOCK_D=_block_d(d))
    return out
