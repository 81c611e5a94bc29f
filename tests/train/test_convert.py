"""`xc convert`: a BatchTopK crosscoder as a JumpReLU one, thresholds calibrated on store rows."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from xcli.analysis.reconstruction import reconstruction
from xcli.cli import cli
from xcli.crosscoder import jumprelu
from xcli.crosscoder.model import load
from xcli.data import synth
from xcli.data.loader import StoreSet, eval_batches
from xcli.errors import BadInput
from xcli.train import loop as tr
from xcli.train.convert import ConvertConfig, convert, from_batchtopk

K = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A BatchTopK crosscoder trained on a planted store, with a quarter of the chunks held out."""
    root = tmp_path_factory.mktemp("convert")
    store = root / "s.zarr"
    synth.make_store(store, n_tokens=8192, d=12, n_shared=12, n_exclusive=6, active=3.0, chunk_rows=512, seed=5)
    path = tr.train(tr.TrainConfig(stores=(str(store),), output=str(root / "btk.safetensors"), latents=48, k=K,
                                   batch_size=256, steps=150, eval_fraction=0.25, log_every=50,
                                   checkpoint_every=1000, device="cpu", dtype="float32"))
    return store, path


def test_converted_thresholds_keep_l0_and_fvu_on_rows_they_were_not_calibrated_on(trained):
    store, path = trained
    model = load(path)
    stores = StoreSet((str(store),))
    train_chunks, held = stores.hold_out(0.25)
    batches = list(eval_batches(stores, model.read, train_chunks[:4], 256))  # calibrate on training rows
    converted, found = from_batchtopk(model, batches)
    before = reconstruction(model, stores, held, 512, torch.device("cpu"))
    after = reconstruction(converted, stores, held, 512, torch.device("cpu"))
    assert abs(after.l0 - K) <= 0.1 * K, (after.l0, before.l0)
    assert after.fvu_total <= before.fvu_total + 0.02, (after.fvu_total, before.fvu_total)
    # The thresholds are per latent (not BatchTopK's one score threshold over the decoder norms) and positive.
    theta = converted.thresholds().detach()
    live = theta < jumprelu.NEVER_FIRES
    norm_theta = theta[live] * model.decoder_norms().sum(dim=1).detach()[live]
    assert (theta[live] > 0).all() and norm_theta.std() > 0.01 * norm_theta.mean()
    # The calibration itself: on the calibration rows the mean L0 is k up to ties (brute force).
    with torch.no_grad():
        fired = sum(int((converted.encode(b) != 0).sum()) for b in batches)
    rows = sum(len(next(iter(b.values()))) for b in batches)
    assert fired == round(K * rows)
    assert found["scale"] > 0


def test_selected_minima_are_the_smallest_kept_pre_activations_by_brute_force(trained):
    _, path = trained
    model = load(path)
    g = torch.Generator().manual_seed(0)
    batches = [{s.name: torch.randn(64, s.d, generator=g) * 3 for s in model.sources} for _ in range(3)]
    theta = jumprelu.selected_minima(model, batches)
    expected = np.full(model.n_latents, np.inf)
    for x in batches:
        with torch.no_grad():
            pre = model.pre_activations(x).numpy()
            score = np.maximum(pre, 0) * model.decoder_norms().sum(dim=1).numpy()
        cut = np.sort(score.ravel())[-K * len(pre)]  # the k*B best scores of the batch
        kept = (score >= cut) & (score > 0)
        expected = np.minimum(expected, np.where(kept, pre, np.inf).min(axis=0))
    np.testing.assert_allclose(theta.numpy(), expected, rtol=1e-6)


def test_xc_convert_writes_a_jumprelu_checkpoint_that_xc_eval_reads(trained, tmp_path):
    store, path = trained
    out = tmp_path / "jr.safetensors"
    result = CliRunner().invoke(cli, ["convert", str(path), str(store), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        assert f.get_tensor("threshold").shape == (48,)
    assert meta["arch"] == "jumprelu" and meta["converted"]["k"] == K and meta["converted"]["which"] == "held-out"
    assert abs(meta["converted"]["jumprelu"]["l0"] - K) < 1e-3  # calibrated on these rows
    evaluated = CliRunner().invoke(cli, ["eval", str(out), str(store), "-q"])
    assert evaluated.exit_code == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["rows"] == "held-out" and report["l0"] == pytest.approx(meta["converted"]["jumprelu"]["l0"])
    again = CliRunner().invoke(cli, ["convert", str(path), str(store), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_only_batchtopk_converts(trained, tmp_path):
    store, path = trained
    jr, _ = convert(ConvertConfig(checkpoint=str(path), stores=(str(store),), output=str(tmp_path / "jr.safetensors")))
    with pytest.raises(BadInput, match="is a jumprelu crosscoder; xc convert turns a batchtopk one"):
        convert(ConvertConfig(checkpoint=str(jr), stores=(str(store),), output=str(tmp_path / "again.safetensors")))
    assert not (tmp_path / "again.safetensors").exists()
