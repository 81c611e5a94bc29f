"""`xc train --arch jumprelu`: the loss of a step against a hand-written one, resume after a crash,
the checkpoint, and its consumers (xc eval, xc classify)."""

import json

import pytest
import torch
from safetensors import safe_open

import xcli
from test_train import Crash, assert_same_weights, config, crash_at
from xcli.analysis.classify import classify
from xcli.analysis.config import EvalConfig
from xcli.analysis.evaluate import evaluate
from xcli.crosscoder import jumprelu
from xcli.crosscoder.model import Crosscoder
from xcli.data import synth
from xcli.errors import BadInput
from xcli.source import Source
from xcli.train import loop as tr

JUMP = {"arch": "jumprelu", "k": None, "tanh_penalty": 0.5, "steps": 40}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """test_train's small synthetic store (2048 rows in 16 chunks)."""
    path = tmp_path_factory.mktemp("small") / "small.zarr"
    synth.make_store(path, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    return path


SOURCES = [Source("a.x.1", "a", "x", 1, 5), Source("b.x.1", "b", "x", 1, 7)]


def test_the_step_loss_is_recon_plus_tanh_plus_preact_written_out():
    torch.manual_seed(0)
    m = Crosscoder(SOURCES, 12, "jumprelu")
    m.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.b_enc.normal_(0, 0.3)
        m.input_scale.copy_(torch.tensor([1.5, 0.5]))
        m.set_thresholds(torch.linspace(0.05, 1.0, 12))
    g = torch.Generator().manual_seed(1)
    x = {s.name: torch.randn(11, s.d, generator=g) * 2 for s in SOURCES}
    m.tanh_scale, m.preact_penalty = 3.0, 0.25
    parts = tr.loss_parts(m, x, 0.7, torch.zeros(m.n_latents, dtype=torch.bool), 0)
    with torch.no_grad():  # by hand, from the formulas of xcli.crosscoder.jumprelu
        xs = torch.cat([x[s.name] * m.scale(s.name) for s in SOURCES], dim=1)
        W_enc = torch.cat([m.encoder_weight(s.name) for s in SOURCES], dim=0)
        W_dec = torch.cat([m.decoder_weight(s.name) for s in SOURCES], dim=1)
        b_dec = torch.cat([m.decoder_bias(s.name) for s in SOURCES])
        h = xs @ W_enc + m.b_enc
        theta = m.log_threshold.exp()
        f = torch.where(h > theta, h, 0.0)
        norms = m.decoder_weight(SOURCES[0].name).norm(dim=1) + m.decoder_weight(SOURCES[1].name).norm(dim=1)
        recon = ((xs - (f @ W_dec + b_dec)) ** 2).sum() / 11
        tanh = 0.7 * torch.tanh(3.0 * f * norms).sum() / 11
        preact = 0.25 * (torch.relu(theta - h) * norms).sum() / 11
    torch.testing.assert_close(parts.recon.detach(), recon, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(parts.sparsity.detach(), tanh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.preact.detach(), preact, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.loss.detach(), recon + tanh + preact, rtol=1e-5, atol=1e-5)
    assert float(parts.l0) == float((f != 0).sum() / 11) and float(parts.aux) == 0
    parts.loss.backward()
    assert m.log_threshold.grad is not None and m.log_threshold.grad.abs().sum() > 0


def test_jumprelu_trains_resumes_exactly_and_its_consumers_read_it(small_store, tmp_path):
    records = []
    reference = tr.train(config(small_store, tmp_path / "ref.safetensors", **JUMP), on_log=records.append)
    out = tmp_path / "x.safetensors"
    with pytest.raises(Crash):
        tr.train(config(small_store, out, **JUMP), on_log=crash_at(25))
    tr.train(config(small_store, out, resume=True, **JUMP))
    assert_same_weights(out, reference)  # threshold included

    with safe_open(str(reference), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        theta = f.get_tensor("threshold")
    assert meta["arch"] == "jumprelu" and meta["k"] is None and theta.shape == (16,)
    hp = meta["hyperparameters"]
    assert (hp["tanh_penalty"], hp["tanh_scale"], hp["preact_penalty"], hp["bandwidth"]) == \
        (0.5, jumprelu.DEFAULT_TANH_SCALE, jumprelu.DEFAULT_PREACT_PENALTY, jumprelu.DEFAULT_BANDWIDTH)
    assert not torch.allclose(theta, torch.full((16,), jumprelu.DEFAULT_INITIAL_THRESHOLD))  # the thresholds learned
    train = [r for r in records if r["kind"] == "train"]
    assert train[-1]["tanh_penalty"] == pytest.approx(0.5 * 40 / 40) and train[0]["tanh_penalty"] < 0.1
    assert all(r["preact"] >= 0 for r in train) and train[-1]["l0"] > 0

    model = xcli.load(reference)
    report = evaluate(EvalConfig(checkpoint=str(reference), stores=(str(small_store),)))
    assert report["l0"] == pytest.approx(meta["training"]["l0"], rel=1e-4)
    assert 0 < report["fvu_total"] < 1
    assert len(classify(model).classes) == 16


@pytest.mark.parametrize("overrides, message", [
    (dict(arch="jumprelu", k=4), "--k applies to --arch topk and batchtopk; jumprelu"),
    (dict(arch="batchtopk", tanh_penalty=1.0), "--tanh-penalty applies to --arch jumprelu, not batchtopk"),
    (dict(arch="jumprelu", k=None, bandwidth=0.0), "--bandwidth 0.0 must be positive"),
    (dict(arch="jumprelu", k=None, k_aux=8), "--k-aux applies to --arch topk and batchtopk"),
    ({"arch": "jumprelu", "k": None, "l1": 1.0}, "--l1 applies to --arch relu; jumprelu uses --tanh-penalty"),
])
def test_jumprelu_options_are_checked(small_store, tmp_path, overrides, message):
    with pytest.raises(BadInput, match=message):
        config(small_store, tmp_path / "x.safetensors", **overrides)
