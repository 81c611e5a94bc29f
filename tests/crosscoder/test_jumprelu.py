"""JumpReLU crosscoders: forward, straight-through gradients, loss terms and the checkpoint,
each against an independent computation (numpy, or plain torch written out by hand)."""

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import xcli
from test_crosscoder import dense_reference
from xcli.crosscoder import jumprelu
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.source import Source

SOURCES = [Source("a.resid_post.1", "a", "resid_post", 1, 6), Source("b.resid_post.1", "b", "resid_post", 1, 10)]
F = 24


def model(**kw):
    torch.manual_seed(0)
    m = cc.Crosscoder(SOURCES, F, "jumprelu", None, **kw)
    m.init_weights(torch.Generator().manual_seed(0), decoder_norm=0.5)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        for b in m.b_dec:
            b.normal_()
        m.input_scale.copy_(torch.tensor([2.0, 0.5]))
        m.log_threshold.copy_(torch.linspace(-3, 0.5, F))  # thresholds from 0.05 to 1.6
    return m


def batch(n=7):
    g = torch.Generator().manual_seed(1)
    return {s.name: torch.randn(n, s.d, generator=g) * 2 for s in SOURCES}


def numpy_forward(m, x):
    """test_crosscoder's numpy crosscoder with a threshold per latent: (pre, f, reconstruction per source)."""
    pre, W_dec, b_dec, scales = dense_reference(m, x)
    theta = np.exp(m.log_threshold.detach().numpy())
    f = np.where(pre > theta, pre, 0.0)
    recon = f @ W_dec + b_dec
    return pre, f, {SOURCES[0].name: recon[:, :6] / scales[0], SOURCES[1].name: recon[:, 6:] / scales[1]}


def test_forward_matches_a_numpy_jumprelu_with_per_latent_thresholds():
    m, x = model(), batch()
    pre, f, recon = numpy_forward(m, x)
    assert 0 < (f != 0).sum() < f.size  # the thresholds cut some positive pre-activations
    assert ((pre > 0) & (f == 0)).any()
    for mode in (m.train(), m.eval()):
        np.testing.assert_allclose(mode.encode(x).detach().numpy(), f, rtol=1e-5, atol=1e-6)
        out = mode.decode(mode.encode(x))
        for name in recon:
            np.testing.assert_allclose(out[name].detach().numpy(), recon[name], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(m.encode(x).numpy(), f, rtol=1e-5, atol=1e-6)


def test_straight_through_gradients_match_the_rectangle_kernel_formulas():
    torch.manual_seed(3)
    pre = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    log_t = torch.tensor([-1.0, -0.5, 0.0, 0.2, 0.4], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(9, 5, dtype=torch.float64)
    eps = 0.7
    (jumprelu.jumprelu(pre, log_t.exp(), eps) * upstream).sum().backward()
    theta = log_t.detach().exp()
    p = pre.detach()
    window = ((p - theta).abs() < eps / 2).double()  # K((h - θ)/ε) = 1[|h - θ| < ε/2]
    grad_theta = (-(theta / eps) * window * upstream).sum(0)
    np.testing.assert_allclose(log_t.grad.numpy(), (grad_theta * theta).numpy(), rtol=1e-12)  # dθ/dt = θ
    grad_pre = (p > theta).double() * upstream + (theta / eps) * window * upstream
    np.testing.assert_allclose(pre.grad.numpy(), grad_pre.numpy(), rtol=1e-12)
    assert window.sum() > 0 and (window * (p <= theta)).sum() > 0  # the band reaches below the threshold


def test_loss_terms_match_their_formulas():
    m, x = model(), batch()
    pre, f, _ = numpy_forward(m, x)
    norm_sum = sum(np.linalg.norm(m.decoder_weight(s.name).detach().numpy(), axis=1) for s in SOURCES)
    theta = np.exp(m.log_threshold.detach().numpy())
    with torch.no_grad():
        out = m(x)
        norms = m.decoder_norms().sum(dim=1)
        c = 4.0
        tanh = float(jumprelu.tanh_penalty(out.latents, norms, c))
        preact = float(jumprelu.preact_penalty(out.pre_activations, m.thresholds(), norms))
    np.testing.assert_allclose(tanh, np.tanh(c * f * norm_sum).sum(), rtol=1e-5)
    np.testing.assert_allclose(preact, (np.maximum(theta - pre, 0) * norm_sum).sum(), rtol=1e-5)
    assert [jumprelu.tanh_penalty_at(s, 10, 20.0) for s in (0, 4, 9, 12)] == [2.0, 10.0, 20.0, 20.0]


def test_checkpoint_holds_the_thresholds_and_loads_back(tmp_path):
    m, x = model(), batch()
    path = cc.save(m, tmp_path / "jr.safetensors")
    with safe_open(str(path), framework="pt") as f:
        np.testing.assert_allclose(f.get_tensor("threshold").numpy(), np.exp(np.linspace(-3, 0.5, F)), rtol=1e-6)
    back = xcli.load(path)
    assert back.arch == "jumprelu" and back.k is None and not back.training
    np.testing.assert_allclose(back.encode(x).detach().numpy(), m.encode(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    assert "jumprelu" in back.metadata


def rewrite(path, out, **tensors):
    with safe_open(str(path), framework="pt") as f:
        meta, data = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors)
    data = {k: v for k, v in data.items() if v is not None}
    save_file(data, str(out), metadata=meta)
    return out


@pytest.mark.parametrize("threshold, message", [
    (torch.zeros(()), "tensor threshold has shape (), expected (24,)"),
    (None, "tensor threshold is missing"),
    (torch.full((F,), -0.5), "threshold holds -0.5 at latent 0; JumpReLU thresholds must be 0 or more"),
    (torch.full((F,), math.nan), "tensor threshold holds non-finite values"),
])
def test_a_bad_threshold_tensor_is_refused(tmp_path, threshold, message):
    path = cc.save(model(), tmp_path / "jr.safetensors")
    bad = rewrite(path, tmp_path / "bad.safetensors", threshold=threshold)
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        cc.load(bad)


def test_a_zero_threshold_is_a_relu(tmp_path):
    m, x = model(), batch()
    path = cc.save(m, tmp_path / "jr.safetensors")
    zero = cc.load(rewrite(path, tmp_path / "zero.safetensors", threshold=torch.zeros(F)))
    pre, *_ = numpy_forward(m, x)
    np.testing.assert_allclose(zero.encode(x).detach().numpy(), np.maximum(pre, 0), rtol=1e-5, atol=1e-6)
