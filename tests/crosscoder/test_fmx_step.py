"""The fmx training step that contracts the factors with the batch (never materialising W with grad)
against a dense reference written from the materialised tensors, and against the materialising step."""

import math

import pytest
import torch

from xcli.crosscoder import fmx
from xcli.source import Source
from xcli.train import loop as tr
from xcli.train.loop import AUX_WEIGHT

LAYERS = [Source(f"m.resid.{layer}", "m", "resid", layer, 5) for layer in range(4)]
NAMES = [s.name for s in LAYERS]
F = 24
PATHS = [(), ("enc",), ("dec",), ("enc", "dec")]


def make_model(factorization, arch="batchtopk", read=None, write=None, seed=0):
    ranks = (2, 3, 4) if factorization == "tr" else (7,)
    torch.manual_seed(seed)
    m = fmx.FmxCrosscoder(LAYERS, F, arch, 3, read, write, factorization=factorization, ranks=ranks)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        m.input_scale.copy_(torch.tensor([1.5, 0.7, 1.1, 0.9]))
    return m.train()


def batch(rows=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(rows, 5, generator=g) for name in NAMES}


def reference_loss(m, x, x_in, dead, k_aux):
    """The loss written out densely from W = Factorized.tensor(): BatchTopK (or TopK) on f · Σ_l ||W_dec[l, :, i]||,
    decode, and AuxK on the dead latents' largest ReLU pre-activations (Gao et al. 2024)."""
    W_enc, W_dec = m.enc.tensor(), m.dec.tensor()  # (L, d, F)
    scale = {s.name: m.input_scale[j] for j, s in enumerate(LAYERS)}
    pre = m.b_enc + sum((x_in[name] * scale[name]) @ W_enc[j] for j, name in enumerate(m.read))
    f_all = torch.relu(pre)
    score = f_all.detach() * W_dec.detach().norm(dim=1).sum(dim=0)
    B = pre.shape[0]
    if m.arch == "topk":
        keep = torch.zeros_like(score, dtype=torch.bool).scatter(1, score.topk(m.k, dim=1).indices, True)
    else:
        flat = score.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool).scatter(0, flat.topk(m.k * B).indices, True).view_as(score)
    f = f_all * (keep & (score > 0))
    target = {name: x[name] * scale[name] for name in m.write}
    residual = {name: target[name] - (f @ W_dec[j].T + m.b_dec[j]) for j, name in enumerate(m.write)}
    recon = sum(r.pow(2).sum() for r in residual.values()) / B
    if not (k_aux and dead.any()):
        return recon
    masked = torch.where(dead, f_all, torch.zeros_like(f_all))
    top = masked.topk(min(k_aux, int(dead.sum())), dim=1)
    f_aux = torch.zeros_like(f_all).scatter(1, top.indices, top.values)
    err = sum((residual[name].detach() - f_aux @ W_dec[j].T).pow(2).sum() for j, name in enumerate(m.write))
    variance = sum((r.detach() - r.detach().mean(0)).pow(2).sum() for r in residual.values())
    return recon + AUX_WEIGHT * err / variance


def gradients(m):
    return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("factorization", ["tr", "cp"])
@pytest.mark.parametrize("arch,masked,with_dead,subsets", [
    ("batchtopk", False, False, False),
    ("batchtopk", True, True, False),
    ("topk", False, True, True),
    ("batchtopk", False, True, True),
])
def test_every_step_path_gives_the_dense_reference_loss_and_factor_gradients(factorization, arch, masked,
                                                                             with_dead, subsets):
    read, write = (NAMES[:3], NAMES[1:]) if subsets else (None, None)
    x = batch()
    x_in = fmx.mask_layers(x, read or NAMES, fmx.layer_keep(10, len(read or NAMES), 0.3, 0, 0)) if masked else x
    dead = torch.zeros(F, dtype=torch.bool)
    if with_dead:
        dead[::3] = True
    k_aux = 4
    reference = make_model(factorization, arch, read, write)
    expected = reference_loss(reference, x, x_in, dead, k_aux)
    expected.backward()
    expected_grads = gradients(reference)
    for path in PATHS:
        m = make_model(factorization, arch, read, write)
        m.contracted_parts = path
        parts = tr.loss_parts(m, x, 0.0, dead, k_aux, x_in)
        assert with_dead == bool(parts.aux > 0)
        parts.loss.backward()
        assert torch.allclose(parts.loss, expected, rtol=1e-5, atol=0), path
        grads = gradients(m)
        assert grads.keys() == expected_grads.keys() and any(name.startswith("enc.") for name in grads)
        for name, value in expected_grads.items():
            torch.testing.assert_close(grads[name], value, rtol=1e-4, atol=1e-5, msg=f"{path} {name}")


@pytest.mark.parametrize("rows,cols,n_rows", [
    ([0, 0, 1, 2, 3, 3, 4], [2, 5, 2, 9, 5, 9, 2], 5),  # 3 latents < 5 tokens: through dW's rows
    ([0, 0, 1, 1, 1, 2], [1, 4, 7, 9, 12, 20], 3),  # 6 latents >= 3 tokens: through the tokens
])
def test_the_contracted_decode_equals_a_dense_decode_by_either_route(rows, cols, n_rows):
    from xcli.crosscoder import sparse
    g = torch.Generator().manual_seed(3)
    basis, latent = torch.randn(12, 6, generator=g), torch.randn(F, 6, generator=g)
    rows, cols = torch.tensor(rows), torch.tensor(cols)
    values, weight = torch.rand(len(rows), generator=g), torch.randn(n_rows, 12, generator=g)
    b, lat, v = (t.clone().requires_grad_(True) for t in (basis, latent, values))
    y = sparse.decode_low_rank(sparse.Pairs(rows, cols, n_rows, F), v, (latent @ basis.T), b, lat)
    (y * weight).sum().backward()
    B, L, V = (t.clone().requires_grad_(True) for t in (basis, latent, values))
    dense = torch.zeros(n_rows, F).index_put((rows, cols), V, accumulate=True) @ (L @ B.T)
    (dense * weight).sum().backward()
    torch.testing.assert_close(y, dense)
    for mine, theirs in ((b, B), (lat, L), (v, V)):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_contracted_and_materialised_steps_train_alike_and_deterministically():
    cfg = tr.TrainConfig(stores=("-",), output="-", arch="fmx", latents=F, k=3, batch_size=10, steps=10,
                         warmup=0, lr=1e-2, k_aux=4, dead_tokens=20, mask_prob=0.2, device="cpu")
    finals = {}
    for path in ((), ("enc", "dec"), ("enc", "dec")):
        m = make_model("tr")
        m.contracted_parts = path
        opt = tr.make_optimizer(m, cfg.lr)
        state = tr.TrainState(since_fired=torch.zeros(F, dtype=torch.int64))
        for step in range(5):
            parts = tr.train_step(m, opt, batch(seed=step), state, cfg, None)
        assert parts.aux > 0  # AuxK acted by the last steps
        finals.setdefault(path, []).append({k: v.detach().clone() for k, v in m.state_dict().items()})
    contracted, again = finals[("enc", "dec")]
    for key, value in contracted.items():
        assert torch.equal(value, again[key]), key  # deterministic
        torch.testing.assert_close(value, finals[()][0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_the_cost_model_contracts_the_encoder_at_the_minilm_shape_and_materialises_it_for_a_wide_batch():
    minilm = fmx.FmxCrosscoder([Source(f"l{j}", "m", "resid", j, 384) for j in range(6)], 4096, "batchtopk", 32)
    small = fmx.FmxCrosscoder([Source(f"l{j}", "m", "resid", j, 64) for j in range(6)], 512, "batchtopk", 8)
    assert minilm.enc.rank == math.ceil(math.sqrt(6 * 384)) ** 2 and small.enc.rank == 20 ** 2
    # 2·1024·2304·2304 + 1024·2304·4096 = 20.5G against 3·2304·4096·2304 + 1024·2304·4096 = 74.9G
    assert minilm.contracts("enc", 1024)
    # 2·1024·384·400 + 1024·400·512 = 524M against 3·384·512·400 + 1024·384·512 = 437M; at B = 512, 262M against 336M
    assert not small.contracts("enc", 1024) and small.contracts("enc", 512)
    assert minilm.contracts("dec", 1024) and small.contracts("dec", 1024)
    small.contracted_parts = ()  # what tests and benchmarks force
    assert not small.contracts("enc", 512) and not small.contracts("dec", 1024)
