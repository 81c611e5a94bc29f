"""xc train --shared-latents / --exclusive: the structure holds through training and resume, on the
sparse and the dense path; the options are checked; classify and eval read the result."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import xcli
from test_train import weights
from xcli.analysis.classify import classify
from xcli.analysis.config import ClassifyConfig
from xcli.cli import cli
from xcli.crosscoder.model import Crosscoder
from xcli.data import synth
from xcli.data.store import open_store
from xcli.errors import BadInput
from xcli.train import loop as tr

DFC = {"shared_latents": 4, "exclusive": ("a=3", "b=3")}


@pytest.fixture
def store(small_store):
    return small_store


def config(store, out, **overrides):
    base = dict(stores=(str(store),), output=str(out), latents=20, k=2, batch_size=64, steps=40,
                checkpoint_every=10, log_every=5, eval_fraction=0.125, dead_tokens=256, shuffle_buffer=256,
                device="cpu", **DFC)
    return tr.TrainConfig(**{**base, **overrides})


def assert_structure(dec_a: torch.Tensor, dec_b: torch.Tensor) -> None:
    """Latents 0-3 tied, 4-6 dedicated to a, 7-9 to b (the layout of DFC on 20 latents)."""
    assert torch.equal(dec_a[:4], dec_b[:4])
    assert not dec_b[4:7].any() and not dec_a[7:10].any()  # exactly zero, not small
    assert dec_a[4:7].abs().sum(1).min() > 0 and dec_b[7:10].abs().sum(1).min() > 0


@pytest.mark.parametrize("arch", ["batchtopk", "topk", "relu"])
def test_tied_rows_stay_equal_and_dedicated_rows_stay_exactly_zero(store, tmp_path, arch, monkeypatch):
    overrides = {"k": None, "l1": 1.0} if arch == "relu" else {}
    sparse_calls = []
    forward_sparse = Crosscoder.forward_sparse
    monkeypatch.setattr(Crosscoder, "forward_sparse",
                        lambda self, *a, **kw: sparse_calls.append(1) or forward_sparse(self, *a, **kw))
    path = tr.train(config(store, tmp_path / "x.safetensors", arch=arch, **overrides))
    assert bool(sparse_calls) == (arch != "relu")  # topk and batchtopk trained on the sparse path
    w = weights(path)
    assert_structure(w["decoder.a"], w["decoder.b"])
    meta = xcli.load(path).metadata
    assert meta["partition"]["dedicated"] == [{"model": "a", "start": 4, "stop": 7}, {"model": "b", "start": 7, "stop": 10}]
    assert meta["partition"]["tied"]["penalty"] == (0.15 if arch == "relu" else 1.0)
    assert meta["hyperparameters"]["exclusive"] == ["a=3", "b=3"]


def test_resume_of_a_dfc_run_ends_with_the_uninterrupted_weights(store, tmp_path):
    reference = tr.train(config(store, tmp_path / "ref.safetensors"))
    out = tmp_path / "x.safetensors"

    class Crash(Exception):
        pass

    def crash_at_25(record):
        if record["kind"] == "train" and record["step"] == 25:
            raise Crash

    with pytest.raises(Crash):
        tr.train(config(store, out), on_log=crash_at_25)
    mid = weights(out)
    assert json.loads(safe_open(str(out), "pt").metadata()["xc"])["training"]["step"] == 20
    assert_structure(mid["decoder.a"], mid["decoder.b"])
    state = torch.load(tr.state_path(out), weights_only=True)["model"]
    assert not state["W_dec.1"][4:7].any()  # the training state holds the zeros too
    with pytest.raises(BadInput, match="--exclusive"):  # another partition is another run
        tr.train(config(store, out, resume=True, exclusive=("a=2", "b=3")))
    tr.train(config(store, out, resume=True))
    ref, got = weights(reference), weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert_structure(got["decoder.a"], got["decoder.b"])


def test_classify_reports_dedicated_latents_with_their_activity_and_latent_scaling(store, tmp_path):
    path = tr.train(config(store, tmp_path / "x.safetensors", steps=60))
    result = classify(xcli.load(path), open_store(store), ClassifyConfig(device="cpu"))
    rows = list(result.rows())
    assert [r["block"] for r in rows[:11]] == ["tied"] * 4 + ["dedicated:a"] * 3 + ["dedicated:b"] * 3 + ["free"]
    for r in rows[4:10]:
        assert r["class"] in (r["block"], "dead")
        assert r["share"][r["block"].split(":")[1]] == 1.0  # the other model's norm is exactly zero
        assert "frequency" in r and "nu_epsilon" in r and r["ls_verdict"] is not None or r["class"] == "dead"
    assert any(r["class"].startswith("dedicated:") and r["frequency"] > 0 for r in rows)
    assert all(not r["class"].startswith("dedicated:") for r in rows[:4] + rows[10:])
    assert result.summary()["classes"].get("dedicated:a", 0) + result.summary()["classes"].get("dedicated:b", 0) > 0


def test_eval_runs_on_a_dfc_checkpoint(store, tmp_path):
    path = tr.train(config(store, tmp_path / "x.safetensors"))
    result = CliRunner().invoke(cli, ["eval", str(path), str(store), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert math.isfinite(report["fvu_total"]) and report["fvu_total"] < 1


@pytest.mark.parametrize("overrides, fragment", [
    ({"shared_penalty": 0.2}, "--shared-penalty scales an L1 penalty, which --arch batchtopk does not have"),
    ({"shared_latents": 0, "shared_penalty": 0.2, "arch": "relu", "k": None}, "--shared-penalty applies to --shared-latents"),
    ({"exclusive": ("c=3",)}, "names a model that writes no source; models are: a, b"),
    ({"exclusive": ("a=3", "a=2")}, "--exclusive names model 'a' twice"),
    ({"exclusive": ("a:3",)}, "--exclusive 'a:3' is not MODEL=N"),
    ({"shared_latents": 10, "exclusive": ("a=6", "b=5")}, "take 21 latents, more than the 20 there are"),
    ({"shared_latents": -1}, "--shared-latents -1 must be 0 or more"),
    ({"arch": "fmx"}, "do not combine with --arch fmx"),
    ({"arch": "relu", "k": None, "shared_penalty": 1.5}, "--shared-penalty 1.5 must be above 0 and at most 1"),
])
def test_bad_partition_options_are_one_line(store, tmp_path, overrides, fragment):
    with pytest.raises(BadInput, match=fragment.replace("(", r"\(")):
        tr.train(config(store, tmp_path / "x.safetensors", **overrides))
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_takes_repeated_exclusive_options(store, tmp_path):
    out = tmp_path / "x.safetensors"
    args = ["train", str(store), "-o", str(out), "--latents", "20", "--k", "2", "--batch-size", "64", "--steps", "10",
            "--device", "cpu", "--shared-latents", "4", "--exclusive", "a=3", "--exclusive", "b=3", "--quiet"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    w = weights(out)
    assert not w["decoder.b"][4:7].any() and not w["decoder.a"][7:10].any()
    bad = CliRunner().invoke(cli, [*args[:-5], "--exclusive", "a=x"])
    assert bad.exit_code == 2 and "'a=x' is not MODEL=N" in bad.output


def test_a_full_partition_recovers_exclusive_features_that_plain_batchtopk_absorbs(tmp_path):
    """Planted: each exclusive feature fires only with its shared trigger, on half of its firings
    (xc synth --trigger 0.5), so a plain crosscoder can explain the pair with one latent whose
    decoders differ between the models. With every latent tied or dedicated there is no such latent,
    and the exclusive directions get latents of their own. The set-up of benchmarks/dfc_recall.py
    (trigger 0.5, plain against full8), two seeds; the direction of the effect only."""
    recall = {"plain": [], "full": []}
    for seed in (0, 1):
        store = tmp_path / f"s{seed}.zarr"
        truth = synth.generate(synth.load_spec(None, models=("a", "b"), width=16, shared=12, exclusive=4,
                                               active=3.0, tokens=8192, trigger=0.5, seed=seed), store)
        planted = np.concatenate([truth.decoders[n] for n in truth.names], axis=1)
        planted /= np.linalg.norm(planted, axis=1, keepdims=True)
        exclusive = [g for g, k in enumerate(truth.kinds) if k.startswith("exclusive:")]
        for name, options in (("plain", {}), ("full", {"shared_latents": 32, "exclusive": ("a=8", "b=8")})):
            path = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / f"{name}{seed}.safetensors"),
                                           latents=48, k=3, batch_size=256, lr=4e-3, steps=400, eval_fraction=0.05,
                                           dead_tokens=2000, shuffle_buffer=4096, checkpoint_every=10 ** 6,
                                           device="cpu", seed=seed, **options))
            m = xcli.load(path)
            classes = classify(m, None, ClassifyConfig(device="cpu")).classes
            raw = np.concatenate([(m.decoder_weight(n) / m.scale(n)).detach().numpy() for n in truth.names], 1)
            cos = planted @ (raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)).T
            owner = [c.split(":")[1] if c.startswith(("exclusive:", "dedicated:")) else None for c in classes]
            found = [any(cos[g, j] > 0.9 and owner[j] == truth.kinds[g].split(":")[1] for j in range(len(classes)))
                     for g in exclusive]
            recall[name].append(float(np.mean(found)))
    assert np.mean(recall["full"]) >= np.mean(recall["plain"]) + 0.3, recall


def test_a_run_recorded_before_the_partition_options_still_resumes(store, tmp_path):
    out = tmp_path / "x.safetensors"
    plain = {"shared_latents": 0, "exclusive": ()}
    tr.train(config(store, out, **plain))
    meta = xcli.load(out).metadata
    old = {k: v for k, v in meta["hyperparameters"].items() if k not in ("shared_latents", "shared_penalty", "exclusive")}
    assert meta["hyperparameters"]["exclusive"] == [] and meta["hyperparameters"]["shared_latents"] == 0
    tr.check_same_run(old, meta["hyperparameters"], out)  # no error: the run used the defaults
    with pytest.raises(BadInput, match="--shared-latents is 4 but the run"):
        tr.check_same_run(old, {**meta["hyperparameters"], "shared_latents": 4}, out)
