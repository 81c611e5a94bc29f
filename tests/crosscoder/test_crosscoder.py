import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

import xcli
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.source import Source

SOURCES = [Source("a.resid_post.1", "a", "resid_post", 1, 6), Source("b.resid_post.1", "b", "resid_post", 1, 10)]


def model(arch="relu", k=None, F=24, **kw):
    torch.manual_seed(0)
    m = cc.Crosscoder(SOURCES, F, arch, k, **kw)
    m.init_weights(torch.Generator().manual_seed(0), decoder_norm=0.5)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        for b in m.b_dec:
            b.normal_()
        m.input_scale.copy_(torch.tensor([2.0, 0.5]))
    return m


def batch(n=5):
    g = torch.Generator().manual_seed(1)
    return {s.name: torch.randn(n, s.d, generator=g) for s in SOURCES}


def dense_reference(m, x):
    """The crosscoder as one concatenated SAE, written out independently with numpy."""
    scales = m.input_scale.numpy()
    xs = np.concatenate([x[s.name].numpy() * scales[i] for i, s in enumerate(SOURCES)], axis=1)
    W_enc = np.concatenate([m.encoder_weight(s.name).detach().numpy() for s in SOURCES], axis=0)
    W_dec = np.concatenate([m.decoder_weight(s.name).detach().numpy() for s in SOURCES], axis=1)
    b_dec = np.concatenate([m.decoder_bias(s.name).detach().numpy() for s in SOURCES])
    pre = xs @ W_enc + m.b_enc.detach().numpy()
    return pre, W_dec, b_dec, scales


def test_relu_matches_concatenated_dense_reference():
    m, x = model(), batch()
    pre, W_dec, b_dec, scales = dense_reference(m, x)
    f = np.maximum(pre, 0)
    np.testing.assert_allclose(m.encode(x).detach().numpy(), f, rtol=1e-5, atol=1e-6)
    recon = f @ W_dec + b_dec
    out = m.decode(m.encode(x))
    np.testing.assert_allclose(out[SOURCES[0].name].detach().numpy(), recon[:, :6] / scales[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[SOURCES[1].name].detach().numpy(), recon[:, 6:] / scales[1], rtol=1e-5, atol=1e-5)


def test_topk_keeps_the_k_best_scores_per_token_by_brute_force():
    m, x = model("topk", k=3), batch()
    pre, W_dec, *_ = dense_reference(m, x)
    norms = np.linalg.norm(W_dec[:, :6], axis=1) + np.linalg.norm(W_dec[:, 6:], axis=1)
    f = np.maximum(pre, 0)
    expected = np.zeros_like(f)
    for t in range(f.shape[0]):
        best = sorted(range(f.shape[1]), key=lambda i: -f[t, i] * norms[i])[:3]
        expected[t, best] = f[t, best]
    np.testing.assert_allclose(m.encode(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_batchtopk_selects_k_times_batch_and_inference_uses_the_threshold():
    m, x = model("batchtopk", k=2), batch(6)
    pre, W_dec, *_ = dense_reference(m, x)
    norms = np.linalg.norm(W_dec[:, :6], axis=1) + np.linalg.norm(W_dec[:, 6:], axis=1)
    score = np.maximum(pre, 0) * norms
    train_f = m.encode(x, batch_select=True).detach().numpy()
    cut = np.sort(score.ravel())[-12]
    assert (train_f > 0).sum() == 12
    np.testing.assert_array_equal(train_f > 0, score >= cut)
    with torch.no_grad():
        m.threshold.fill_(float(np.median(score[score > 0])))
    m.eval()
    infer = m.encode(x).detach().numpy()
    np.testing.assert_array_equal(infer > 0, score > m.threshold.item())
    # A token's code does not depend on the rest of its batch at inference.
    single = m.encode({n: v[:1] for n, v in x.items()}).detach().numpy()
    np.testing.assert_allclose(single, infer[:1], rtol=1e-6)


def test_save_load_roundtrip_and_plain_safetensors_layout(tmp_path):
    m, x = model("batchtopk", k=2), batch()
    with torch.no_grad():
        m.threshold.fill_(0.3)
    path = cc.save(m, tmp_path / "x.safetensors", extra={"training": {"tokens": 10}})
    loaded = xcli.load(path)
    assert not loaded.training and loaded.metadata["training"] == {"tokens": 10}
    torch.testing.assert_close(loaded.encode(x), m.eval().encode(x))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["xc"])
        assert f.get_tensor("encoder.a.resid_post.1").shape == (6, 24)
        assert f.get_tensor("decoder.b.resid_post.1").shape == (24, 10)
        assert f.get_tensor("input_scale.b.resid_post.1").shape == ()
    assert keys == {"encoder_bias", "threshold", *(f"{p}.{s.name}" for s in SOURCES
                    for p in ("encoder", "decoder", "decoder_bias", "input_scale"))}
    assert meta["arch"] == "batchtopk" and meta["k"] == 2 and meta["sources"][1]["d"] == 10


def test_transcoder_reads_one_source_and_writes_another():
    m = model(read=[SOURCES[0].name], write=[SOURCES[1].name])
    x = batch()
    out = m.decode(m.encode({SOURCES[0].name: x[SOURCES[0].name]}))
    assert list(out) == [SOURCES[1].name] and out[SOURCES[1].name].shape == (5, 10)


def test_bad_configurations():
    with pytest.raises(BadInput, match="--k"):
        cc.Crosscoder(SOURCES, 8, "topk", k=8)
    with pytest.raises(BadInput, match="--arch"):
        cc.Crosscoder(SOURCES, 8, "gated")
    with pytest.raises(BadInput, match="unknown source 'c'"):
        cc.Crosscoder(SOURCES, 8, "relu", read=["c"])


def test_load_refuses_non_checkpoints(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(BadInput, match="does not exist"):
        xcli.load(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_text("not a file")
    with pytest.raises(BadInput, match="not a safetensors"):
        xcli.load(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(BadInput, match="without xc metadata"):
        xcli.load(tmp_path / "plain.safetensors")


def test_aux_latents_are_the_top_k_aux_relu_pre_activations_among_dead_latents():
    m, x = model("topk", k=3), batch(7)
    pre = m.pre_activations(x).detach()
    dead = torch.zeros(24, dtype=torch.bool)
    dead[[1, 4, 5, 9, 13, 20]] = True
    aux = m.aux_latents(pre, dead, 2).numpy()
    relu = np.maximum(pre.numpy(), 0)
    for t in range(7):
        candidates = sorted([i for i in range(24) if dead[i]], key=lambda i: -relu[t, i])[:2]
        expected = np.zeros(24)
        expected[candidates] = relu[t, candidates]
        np.testing.assert_allclose(aux[t], expected, rtol=1e-6)
    assert not m.aux_latents(pre, torch.zeros(24, dtype=torch.bool), 2).any()
    # More dead latents asked for than there are: all dead ones are candidates.
    assert (m.aux_latents(pre, dead, 100).numpy()[:, ~dead.numpy()] == 0).all()


def test_batch_threshold_is_the_smallest_selected_score_and_updates_as_an_ema():
    m, x = model("batchtopk", k=2), batch(6)
    f = m.encode(x, batch_select=True).detach()
    pre, W_dec, *_ = dense_reference(m, x)
    norms = np.linalg.norm(W_dec[:, :6], axis=1) + np.linalg.norm(W_dec[:, 6:], axis=1)
    score = np.maximum(pre, 0) * norms
    expected = np.sort(score.ravel())[-12]  # the 12th largest = the smallest of k*B kept
    assert m.batch_threshold(f).item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        m.threshold.fill_(1.0)
    m.update_threshold(torch.tensor(3.0), decay=0.75)
    assert m.threshold.item() == pytest.approx(0.75 * 1.0 + 0.25 * 3.0)


def test_decoder_bias_starts_at_the_source_mean_in_normalised_units():
    m = model()
    means = {s.name: torch.arange(s.d, dtype=torch.float32) for s in SOURCES}
    m.init_decoder_bias(means)
    # Decoding nothing gives back the mean in raw units.
    out = m.decode(torch.zeros(1, 24))
    for s in SOURCES:
        torch.testing.assert_close(out[s.name][0], means[s.name])


def test_calibrated_threshold_gives_k_latents_per_token_on_its_rows():
    m = model("batchtopk", k=3).eval()
    xs = [batch(40), batch(17)]  # two batches of unequal size
    threshold = m.calibrate_threshold(xs)
    # Independently: the scores of all rows in numpy; midway between the k*N-th and (k*N+1)-th largest.
    score = np.concatenate([np.maximum(dense_reference(m, x)[0], 0) for x in xs])
    _, W_dec, *_ = dense_reference(m, xs[0])
    score = score * (np.linalg.norm(W_dec[:, :6], axis=1) + np.linalg.norm(W_dec[:, 6:], axis=1))
    assert threshold == pytest.approx(np.sort(score.ravel())[-(3 * 57 + 1):][:2].mean(), rel=1e-5)
    with torch.no_grad():
        l0 = sum(int((m.encode(x) > 0).sum()) for x in xs) / 57
    assert l0 == pytest.approx(3.0)
    # Fewer positive scores than k*N: everything positive fires, the threshold is 0.
    with torch.no_grad():
        m.b_enc.fill_(-100.0)
    assert m.calibrate_threshold(xs) == 0.0
