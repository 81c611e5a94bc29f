"""The sparse TopK/BatchTopK path against the dense computation: selection, forward, every gradient."""

import pytest
import torch

from xcli.crosscoder import sparse
from xcli.crosscoder.model import Crosscoder
from xcli.source import Source
from xcli.train import loop as tr

# Three sources of different widths; the encoder reads a and b, the decoder writes b and c.
SOURCES = [Source("a", "a", "s", 0, 5), Source("b", "b", "s", 0, 7), Source("c", "c", "s", 0, 11)]


def make(arch, k=4, F=40, read=("a", "b"), write=("b", "c"), seed=0):
    torch.manual_seed(seed)
    m = Crosscoder(SOURCES, F, arch, k, list(read), list(write))
    m.init_weights(torch.Generator().manual_seed(seed), decoder_norm=0.6)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.2)
        for b in m.b_dec:
            b.normal_(0, 0.3)
        for w in m.W_enc:  # encoder != decoder^T, so that no gradient is accidentally symmetric
            w.add_(torch.randn_like(w) * 0.3)
        m.input_scale.copy_(torch.tensor([1.5, 0.7, 1.2]))
    g = torch.Generator().manual_seed(seed + 1)
    x = {s.name: torch.randn(13, s.d, generator=g) for s in SOURCES}
    return m.train(), x


def dense_and_sparse_grads(m, x, batch_select=True):
    """A generic loss (random weights on each reconstruction) through both paths: outputs and grads."""
    g = torch.Generator().manual_seed(7)
    weights = {n: torch.randn(13, m.decoder_weight(n).shape[1], generator=g) for n in m.write}
    results = []
    for path in ("dense", "sparse"):
        m.zero_grad()
        if path == "dense":
            out = m(x, batch_select=batch_select)
            f, recon = out.latents, out.reconstruction
        else:
            out = m.forward_sparse(x, batch_select=batch_select)
            f, recon = out.pairs.dense(out.values), out.reconstruction
        loss = sum((recon[n] * weights[n]).sum() + recon[n].pow(2).sum() for n in m.write)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in m.named_parameters()}
        results.append((f.detach(), {n: v.detach() for n, v in recon.items()}, grads))
    return results


@pytest.mark.parametrize("encoder_grad", ["sparse", "dense"])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_forward_and_every_gradient_match_the_dense_computation(arch, encoder_grad, monkeypatch):
    monkeypatch.setattr(sparse, "ENCODER_GRAD", encoder_grad)
    m, x = make(arch)
    (f_d, recon_d, grads_d), (f_s, recon_s, grads_s) = dense_and_sparse_grads(m, x)
    assert (f_d != 0).sum() > 0
    torch.testing.assert_close(f_s, f_d, rtol=1e-5, atol=1e-6)
    for n in m.write:
        torch.testing.assert_close(recon_s[n], recon_d[n], rtol=1e-5, atol=1e-5)
    # W_enc.0/1 (sources a, b), b_enc, W_dec.0/1 (sources b, c), b_dec.0/1
    assert set(grads_d) == {"W_enc.0", "W_enc.1", "b_enc", "W_dec.0", "W_dec.1", "b_dec.0", "b_dec.1"}
    for name in grads_d:
        assert grads_d[name].abs().max() > 0, name
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


def test_batchtopk_at_inference_uses_the_threshold_on_both_paths():
    m, x = make("batchtopk")
    with torch.no_grad():
        m.threshold.fill_(0.4)
    m.eval()
    (f_d, recon_d, _), (f_s, recon_s, _) = dense_and_sparse_grads(m, x, batch_select=None)
    assert 0 < (f_d != 0).sum() < f_d.numel()
    torch.testing.assert_close(f_s, f_d, rtol=1e-5, atol=1e-6)
    for n in m.write:
        torch.testing.assert_close(recon_s[n], recon_d[n], rtol=1e-5, atol=1e-5)


def loss_on_both_paths(m, x):
    """The training loss with AuxK (every third latent dead) and its gradients, dense then sparse."""
    dead = torch.zeros(m.n_latents, dtype=torch.bool, device=m.b_enc.device)
    dead[::3] = True
    results = []
    for use_sparse in (False, True):
        m.sparse_path = use_sparse
        m.zero_grad()
        parts = tr.loss_parts(m, x, l1=0.0, dead=dead, k_aux=5)
        parts.loss.backward()
        results.append((parts, {name: p.grad.clone() for name, p in m.named_parameters()}))
    return results


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_loss_with_auxk_and_its_gradients_match_the_dense_path(arch):
    (dense, grads_d), (sp, grads_s) = loss_on_both_paths(*make(arch))
    assert dense.aux > 0
    for field in ("loss", "recon", "aux", "l0"):
        torch.testing.assert_close(getattr(sp, field), getattr(dense, field), rtol=1e-5, atol=1e-6, msg=field)
    assert torch.equal(sp.fired, dense.fired)
    if arch == "batchtopk":
        torch.testing.assert_close(sp.min_score, dense.min_score)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)


def flat_selection(score, k):
    """BatchTopK by brute force: the k·B largest entries of the whole matrix that are positive."""
    flat = score.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k * score.shape[0]).indices] = True
    return keep.view_as(score) & (score > 0)


@pytest.mark.parametrize("case", ["random", "one token dominates", "few positive", "candidates cover all"])
def test_batchtopk_partial_selection_equals_the_full_selection(case):
    g = torch.Generator().manual_seed(3)
    score = torch.randn(64, 300, generator=g).relu()
    k, candidates = 5, None
    if case == "one token dominates":  # rows 3 and 9 hold more than 2k of the batch's top entries: searched in full
        score[3] += 10
        score[9, :40] += 5
    if case == "few positive":  # fewer than k·B positive entries in the batch
        score = torch.where(torch.rand(64, 300, generator=g) < 0.01, score, torch.zeros(()))
    if case == "candidates cover all":
        score, candidates = score[:, :8], 8
    pairs, smallest = sparse.select_batchtopk(score, k, candidates)
    expected = flat_selection(score, k)
    assert torch.equal(pairs.dense(torch.ones(len(pairs))) > 0, expected)
    assert smallest == score[expected].min()
    if case == "random":
        assert len(pairs) == k * 64


def test_pairs_bags_and_sampled_products_by_brute_force():
    g = torch.Generator().manual_seed(4)
    dense = (torch.rand(6, 9, generator=g) < 0.3) * torch.randn(6, 9, generator=g)
    dense[2] = 0  # a token with no pairs
    rows, cols = dense.nonzero(as_tuple=True)
    pairs = sparse.Pairs.from_flat((rows * 9 + cols).flip(0), 6, 9)
    values = pairs.gather(dense)
    assert torch.equal(pairs.dense(values), dense)
    table = torch.randn(6, 4, generator=g)
    torch.testing.assert_close(pairs.bag_by_latent(table, values), dense.T @ table)
    torch.testing.assert_close(pairs.sum_by_latent(values), dense.sum(0))
    w = torch.randn(9, 4, generator=g, requires_grad=True)
    v = values.clone().requires_grad_()
    (y,) = sparse.decode(pairs, v, [w])
    torch.testing.assert_close(y, dense @ w.detach())
    up = torch.randn(6, 4, generator=g)
    (y * up).sum().backward()
    torch.testing.assert_close(v.grad, (up @ w.detach().T)[pairs.rows, pairs.cols])
    torch.testing.assert_close(w.grad, dense.T @ up)


def test_bf16_encoder_matmul_stays_close_to_float32():
    m, x = make("topk", F=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.forward_sparse(x)
    high = m.forward_sparse(x)
    assert low.compute_dtype == torch.bfloat16 and low.encoder_out.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(low.reconstruction[n].dtype == torch.float32 for n in m.write)
    exact = high.encoder_out
    assert (low.encoder_out.float() - exact).norm() / exact.norm() < 1e-2
    # The values at the pairs bf16 selected are the float32 ReLU(pre) there, to bf16 precision.
    pre = exact + m.b_enc.detach()
    torch.testing.assert_close(low.values.detach(), low.pairs.gather(pre).relu(), rtol=0, atol=2e-2 * pre.abs().max().item())


def test_forward_sparse_refuses_relu():
    m, x = make("relu", k=None)
    with pytest.raises(ValueError):
        m.forward_sparse(x)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_training_on_the_sparse_path_matches_the_dense_path(arch, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from xcli.data import synth

    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=1024, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    outputs = {}
    for path in ("sparse", "dense"):
        monkeypatch.setattr(Crosscoder, "sparse_path", path == "sparse")
        cfg = tr.TrainConfig(stores=(str(store),), output=str(tmp_path / f"{path}.safetensors"), arch=arch,
                             latents=24, k=3, batch_size=64, steps=12, warmup=2, eval_fraction=0.125,
                             dead_tokens=128, shuffle_buffer=256, device="cpu", dtype="float32")
        outputs[path] = load_file(tr.train(cfg))
    for key, value in outputs["dense"].items():
        torch.testing.assert_close(outputs["sparse"][key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_factorized_crosscoders_get_the_same_factor_gradients_on_both_paths(arch):
    from xcli.crosscoder import fmx
    layers = [Source(f"m.resid.{layer}", "m", "resid", layer, 5) for layer in range(3)]
    torch.manual_seed(0)
    m = fmx.FmxCrosscoder(layers, 16, arch, 3, factorization="tr", ranks=(2, 3, 4))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(1)
    x = {s.name: torch.randn(9, s.d, generator=g) for s in layers}
    dead = torch.zeros(16, dtype=torch.bool)
    dead[::4] = True
    grads = []
    for use_sparse in (False, True):
        m.sparse_path = use_sparse
        m.zero_grad()
        parts = tr.loss_parts(m.train(), x, l1=0.0, dead=dead, k_aux=3)
        parts.loss.backward()
        grads.append({name: p.grad.clone() for name, p in m.named_parameters()})
    assert any(name.startswith("enc.") for name in grads[0])
    for name, value in grads[0].items():
        torch.testing.assert_close(grads[1][name], value, rtol=1e-4, atol=1e-5, msg=name)
