"""The Triton kernels (xcli/kernels.py) against PyTorch and dense references, forward and gradients.

Without a GPU they run on CPU tensors under the Triton interpreter; with one, compiled on CUDA.
Skipped when triton is not installed."""

import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from xcli.crosscoder import sparse
from xcli.crosscoder.model import Crosscoder
from xcli.train import loop as tr

triton = pytest.importorskip("triton")
from test_sparse import loss_on_both_paths, make  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def kernels():
    """xcli.crosscoder.kernels, compiled on CUDA; on CPU under the interpreter (tests/conftest.py turns it on)."""
    if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU, and TRITON_INTERPRET=1 is not set")
    from xcli.crosscoder import kernels
    return kernels


@pytest.fixture
def triton_path(kernels, monkeypatch):
    """xcli.crosscoder.sparse sends every tensor to the kernels, CPU ones included; yields the count of kernel calls."""
    calls = Counter()

    def counted(name):
        original = getattr(kernels, name)
        return lambda *args: calls.update([name]) or original(*args)

    monkeypatch.setattr(sparse, "use_triton", lambda t: True)
    for name in ("embedding_bag", "sampled_dot"):
        monkeypatch.setattr(kernels, name, counted(name))
    yield calls


def ragged(n_bags, n_items, n_rows, seed):
    """Bags of random sizes, the first, a middle and the last empty; (index, offsets, bag of each item)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 2 * n_items // n_bags, (n_bags,), generator=g)
    sizes[[0, n_bags // 2, -1]] = 0
    bag_of = torch.arange(n_bags).repeat_interleave(sizes)
    index = torch.randint(0, n_rows, (len(bag_of),), generator=g)
    return index, sizes.cumsum(0) - sizes, bag_of


# bf16 inputs, float32 sums: the only error left is rounding the output to bf16 (half an ulp, 2^-9).
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2 ** -8, atol=1e-6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [5, 150])  # within one column block; two blocks, the second partial
def test_embedding_bag_matches_pytorch_and_the_dense_product(kernels, dtype, d):
    index, offsets, bag_of = ragged(n_bags=11, n_items=60, n_rows=9, seed=d)
    g = torch.Generator().manual_seed(1)
    table = torch.randn(9, d, generator=g).to(dtype)
    weights = torch.randn(len(index), generator=g)
    out = kernels.embedding_bag(*(t.to(DEVICE) for t in (index, table, offsets, weights))).cpu()
    assert out.dtype == dtype and out.shape == (11, d)
    dense = torch.zeros(11, 9, dtype=torch.float64).index_put_((bag_of, index), weights.double(), accumulate=True)
    exact = dense @ table.double()
    assert out[[0, 5, 10]].abs().max() == 0  # empty bags
    torch.testing.assert_close(out.double(), exact, **TOLERANCE[dtype])
    pytorch = F.embedding_bag(index, table.float(), offsets, mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(out.float(), pytorch, **TOLERANCE[dtype])
    nothing = kernels.embedding_bag(index[:0].to(DEVICE), table.to(DEVICE), torch.zeros_like(offsets).to(DEVICE),
                                    weights[:0].to(DEVICE))
    assert nothing.shape == (11, d) and nothing.abs().max() == 0  # no items at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [5, 150])
def test_sampled_dot_matches_pytorch_and_the_dense_product(kernels, dtype, d):
    g = torch.Generator().manual_seed(d)
    a, b = torch.randn(7, d, generator=g).to(dtype), torch.randn(12, d, generator=g).to(dtype)
    flat = torch.randperm(7 * 12, generator=g)[:45]  # 45: not a multiple of the block of pairs
    pairs = sparse.Pairs.from_flat(flat, 7, 12)
    out = kernels.sampled_dot(pairs.rows.to(DEVICE), pairs.cols.to(DEVICE), a.to(DEVICE), b.to(DEVICE)).cpu()
    assert out.dtype == torch.float32 and out.shape == (45,)
    exact = (a.double() @ b.double().T)[pairs.rows, pairs.cols]
    torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)  # float32 sums, even from bf16
    torch.testing.assert_close(out, pairs.sampled_dot(a.float(), b.float()), rtol=1e-5, atol=1e-5)
    empty = kernels.sampled_dot(*(t[:0].to(DEVICE) for t in (pairs.rows, pairs.cols)), a.to(DEVICE), b.to(DEVICE))
    assert empty.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_decode_and_its_gradients_on_the_kernels_match_pytorch(kernels, dtype, monkeypatch):
    """xcli.crosscoder.sparse's decoder through the kernels: BatchTopK-like pairs (tokens with none, latents with none)."""
    g = torch.Generator().manual_seed(5)
    dense = (torch.rand(10, 16, generator=g) < 0.3) * torch.randn(10, 16, generator=g)
    dense[[0, 4, 9]] = 0  # tokens with no pairs, first and last included
    dense[:, [0, 7, 15]] = 0  # latents with no pairs
    rows, cols = dense.nonzero(as_tuple=True)
    w = torch.randn(16, 130, generator=g).to(dtype)
    up = torch.randn(10, 130, generator=g)
    results = {}
    for path in ("triton", "pytorch") if dtype == torch.float32 else ("triton",):  # (no bf16 sampled_addmm on CPU)
        monkeypatch.setattr(sparse, "use_triton", lambda t: path == "triton")
        pairs = sparse.Pairs.from_flat((rows * 16 + cols).to(DEVICE), 10, 16)
        v = pairs.gather(dense.to(DEVICE)).requires_grad_()
        weight = w.to(DEVICE).clone().requires_grad_()
        (y,) = sparse.decode(pairs, v, [weight])
        (y.float() * up.to(DEVICE)).sum().backward()
        assert y.dtype == weight.grad.dtype == dtype and v.grad.dtype == torch.float32
        results[path] = {"y": y, "dv": v.grad, "dW": weight.grad}
    up = up.to(dtype).double()  # the backward takes the gradient in the weight's dtype
    exact = {"y": dense.double() @ w.double(), "dv": (up @ w.double().T)[rows, cols], "dW": dense.double().T @ up}
    for name, want in exact.items():
        torch.testing.assert_close(results["triton"][name].cpu().double(), want, **TOLERANCE[dtype], msg=name)
        if "pytorch" in results:
            torch.testing.assert_close(results["triton"][name], results["pytorch"][name], rtol=1e-5, atol=1e-5,
                                       msg=name)
    assert results["triton"]["dW"][[0, 7, 15]].abs().max() == 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_crosscoder_loss_and_every_gradient_on_the_kernels_match_the_dense_computation(triton_path, arch):
    """The training loss with AuxK (a second sparse decode) through the kernels, against the dense path."""
    m, x = make(arch)
    m, x = m.to(DEVICE), {n: v.to(DEVICE) for n, v in x.items()}
    (dense, grads_d), (sp, grads_s) = loss_on_both_paths(m, x)
    assert dense.aux > 0
    # 2 decodes (loss, AuxK) of 2 sources; backward: 2 x 2 dW_dec + 2 x 2 dW_enc bags, 2 x 2 sampled dots
    assert triton_path == {"embedding_bag": 12, "sampled_dot": 4}
    for field in ("loss", "recon", "aux", "l0"):
        torch.testing.assert_close(getattr(sp, field), getattr(dense, field), rtol=1e-5, atol=1e-6, msg=field)
    assert set(grads_d) == {"W_enc.0", "W_enc.1", "b_enc", "W_dec.0", "W_dec.1", "b_dec.0", "b_dec.1"}
    for name in grads_d:
        assert grads_d[name].abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


# -- on a GPU: the real training step, compiled kernels ---------------------------------------------------

@needs_cuda
def test_cuda_tensors_take_the_triton_path(monkeypatch):
    assert sparse.use_triton(torch.zeros(1, device="cuda"))
    monkeypatch.setenv("XC_DISABLE_TRITON", "1")
    assert not sparse.use_triton(torch.zeros(1, device="cuda"))


def train_on(store, output, arch, path, dtype, monkeypatch):
    from safetensors.torch import load_file
    monkeypatch.setattr(Crosscoder, "sparse_path", path != "dense")
    monkeypatch.setenv("XC_DISABLE_TRITON", "1" if path == "pytorch" else "0")
    cfg = tr.TrainConfig(stores=(str(store),), output=str(output), arch=arch, latents=48, k=4, batch_size=128,
                         steps=12, warmup=2, eval_fraction=0.125, dead_tokens=256, shuffle_buffer=512,
                         device="cuda", dtype=dtype)
    return load_file(tr.train(cfg))


@needs_cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_cuda_training_on_the_triton_path_matches_the_dense_and_pytorch_paths(arch, tmp_path, monkeypatch):
    from xcli.data import synth
    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=2048, d=40, n_shared=8, n_exclusive=4, active=2.0, chunk_rows=256, seed=3)
    runs = {(path, dtype): train_on(store, tmp_path / f"{path}-{dtype}.safetensors", arch, path, dtype, monkeypatch)
            for path, dtype in [("triton", "float32"), ("dense", "float32"), ("triton", "bfloat16"),
                                ("pytorch", "bfloat16")]}
    for key, value in runs["dense", "float32"].items():
        torch.testing.assert_close(runs["triton", "float32"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # bf16: the same bf16 encoder matmul and selection on both sparse paths; the rest is float32
    for key, value in runs["pytorch", "bfloat16"].items():
        torch.testing.assert_close(runs["triton", "bfloat16"][key], value, rtol=1e-3, atol=1e-4, msg=key)
