"""Matryoshka crosscoders (xcli/crosscoder/matryoshka.py): the loss against a plain dense computation,
--groups, the checkpoint record, resume, and the consumers."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import xcli
from xcli.cli import cli
from xcli.crosscoder import model as crosscoder
from xcli.crosscoder.matryoshka import Prefixes
from xcli.data import synth
from xcli.data.store import open_store
from xcli.errors import BadInput
from xcli.lm.amplify import steer
from xcli.lm.config import Sampling, SteerConfig
from xcli.source import Source
from xcli.train import loop as tr

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = (3, 7, 12)


def random_matryoshka(rows=16, widths=WIDTHS):
    sources = [Source("a", "a", "s", 0, 5), Source("b", "b", "s", 0, 7)]
    m = crosscoder.Crosscoder(sources, 12, "batchtopk", 3)
    m.matryoshka = Prefixes.uniform(widths)
    m.init_weights(torch.Generator().manual_seed(1), decoder_norm=0.6)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
        for b in m.b_dec:
            b.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        m.input_scale.copy_(torch.tensor([1.5, 0.7]))
    g = torch.Generator().manual_seed(2)
    return m.train(), {s.name: torch.randn(rows, s.d, generator=g) for s in sources}


def dense_reference(m, x, widths, weights):
    """The Matryoshka BatchTopK loss written out in plain torch, prefix by prefix: encode, keep the k*B
    best scores of the batch, then decode each prefix from scratch with the latents beyond it dropped."""
    names = ["a", "b"]
    scale = dict(zip(names, m.input_scale))
    W_enc = [m.encoder_weight(n) for n in names]
    W_dec = [m.decoder_weight(n) for n in names]
    b_dec = [m.decoder_bias(n) for n in names]
    xs = [x[n] * scale[n] for n in names]
    f = torch.relu(xs[0] @ W_enc[0] + xs[1] @ W_enc[1] + m.b_enc)
    score = f * (W_dec[0].norm(dim=1) + W_dec[1].norm(dim=1))
    B = len(xs[0])
    kept = torch.zeros(score.numel())
    kept[score.detach().flatten().topk(m.k * B).indices] = 1
    f = f * kept.view_as(f) * (score > 0)
    total = 0
    for w, weight in zip(widths, weights):
        err = sum(((xt - (f[:, :w] @ Wd[:w] + bd)) ** 2).sum() for xt, Wd, bd in zip(xs, W_dec, b_dec))
        total = total + weight * err / B
    return total


@pytest.mark.parametrize("sparse_path", [True, False])
def test_loss_and_gradients_match_a_dense_prefix_by_prefix_computation(sparse_path):
    m, x = random_matryoshka()
    m.sparse_path = sparse_path
    parts = tr.loss_parts(m, x, l1=0.0, dead=torch.zeros(12, dtype=torch.bool), k_aux=4)
    parts.loss.backward()
    got = {name: p.grad.clone() for name, p in m.named_parameters()}
    m.zero_grad()
    reference = dense_reference(m, x, WIDTHS, [1 / 3] * 3)
    reference.backward()
    assert parts.recon.item() == pytest.approx(reference.item(), rel=1e-5)
    assert parts.aux.item() == 0 and parts.loss.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
    # The reference is not blind to the prefixes: the whole dictionary's error alone is smaller.
    assert dense_reference(m, x, [12], [1]).item() < reference.item()


def test_error_metrics_and_auxk_are_those_of_the_whole_dictionary():
    """FVU, L0 and AuxK see the whole dictionary, as for batchtopk; only the reconstruction loss is nested."""
    m, x = random_matryoshka()
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[0, 4, 8, 11]] = True
    nested = tr.loss_parts(m, x, l1=0.0, dead=dead, k_aux=2)
    m.matryoshka = None
    plain = tr.loss_parts(m, x, l1=0.0, dead=dead, k_aux=2)
    assert nested.aux.item() == pytest.approx(plain.aux.item(), rel=1e-5) and plain.aux.item() > 0
    assert nested.l0 == plain.l0 and torch.equal(nested.fired, plain.fired)
    for n in ("a", "b"):
        assert nested.sq_err[n].item() == pytest.approx(plain.sq_err[n].item(), rel=1e-5)
    assert nested.recon.item() > plain.recon.item()


def test_a_group_without_selected_latents_decodes_to_zero():
    m, x = random_matryoshka(rows=4, widths=(1, 2, 12))
    with torch.no_grad():
        m.b_enc[:2] = -100  # latents 0 and 1 never fire: the first two groups are empty
    out = m.forward_sparse(x, batch_select=True)
    assert torch.equal(out.prefixes[0][0], torch.zeros(4, 5)) and torch.equal(out.prefixes[1][1], torch.zeros(4, 7))
    parts = tr.loss_parts(m, x, l1=0.0, dead=torch.zeros(12, dtype=torch.bool), k_aux=0)
    assert parts.recon.item() == pytest.approx(dense_reference(m, x, (1, 2, 12), [1 / 3] * 3).item(), rel=1e-5)


# -- --groups ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "small.zarr"
    synth.make_store(path, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    return path


def config(store, out, **overrides):
    base = dict(stores=(str(store),), output=str(out), arch="matryoshka", groups=(4, 8), latents=16, k=2,
                batch_size=64, steps=40, checkpoint_every=10, log_every=5, eval_fraction=0.125, dead_tokens=256,
                shuffle_buffer=256, device="cpu")
    return tr.TrainConfig(**{**base, **overrides})


def test_groups_are_nested_prefix_widths_ending_at_the_dictionary(store, tmp_path):
    assert config(store, tmp_path / "x").groups == (4, 8, 16)  # the whole dictionary is added
    assert config(store, tmp_path / "x", groups=(4, 16)).groups == (4, 16)
    resolved = tr.resolve(config(store, tmp_path / "x", groups=None, latents=None, expansion=4), tr.StoreSet([store]))
    assert resolved.latents == 32 and resolved.groups == (2, 8, 32)  # the default: F/16, F/4, F


@pytest.mark.parametrize("overrides, message", [
    (dict(groups=(8, 4)), "--groups 8,4 must be strictly increasing"),
    (dict(groups=(0, 8)), "--groups 0,8 must be strictly increasing prefix widths of at least 1"),
    (dict(groups=(4, 32)), "--groups 4,32 goes beyond the 16 latents"),
    (dict(arch="batchtopk"), "--groups applies to --arch matryoshka, not to batchtopk"),
    (dict(split_sources=True), "--split-sources trains --arch topk or batchtopk, not matryoshka"),
])
def test_bad_groups_are_one_line_errors(store, tmp_path, overrides, message):
    with pytest.raises(BadInput, match=message):
        config(store, tmp_path / "x", **overrides)


def test_cli_refuses_bad_groups_with_exit_2(store, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--arch", "matryoshka", "--latents", "16",
                                      "--groups", "4,2"])
    assert result.exit_code == 2 and "--groups 4,2 must be strictly increasing" in result.output
    assert not out.exists()
    result = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--groups", "4,x"])
    assert result.exit_code == 2 and "not a comma-separated list of whole numbers" in result.output


# -- training, the checkpoint, resume --------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "m.safetensors"
    return tr.train(config(store, out, log=str(out.with_suffix(".jsonl"))))


def test_checkpoint_records_the_prefixes_and_encodes_as_batchtopk(trained, store):
    with safe_open(str(trained), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        assert "threshold" in f.keys()
    assert meta["arch"] == "batchtopk" and meta["hyperparameters"]["arch"] == "matryoshka"
    assert meta["matryoshka"] == {"widths": [4, 8, 16], "weights": [1 / 3] * 3}
    assert meta["hyperparameters"]["groups"] == [4, 8, 16]
    model = xcli.load(trained)
    assert model.matryoshka == Prefixes((4, 8, 16), (1 / 3,) * 3)
    assert 0 < float(model.threshold) and meta["training"]["l0"] > 0
    # At inference it is batchtopk: the same latents as the threshold rule written out.
    x = {n: torch.from_numpy(tr.StoreSet([store]).read_chunk(0, ["a", "b"])[n]) for n in ("a", "b")}
    with torch.no_grad():
        f = model.encode(x)
        pre = model.pre_activations(x)
        score = torch.relu(pre) * model.decoder_norms().sum(dim=1)
        assert torch.equal(f, torch.relu(pre) * (score > model.threshold))
    records = [json.loads(line) for line in trained.with_suffix(".jsonl").read_text().splitlines()]
    assert all(r["threshold"] > 0 for r in records if r["kind"] == "train" and r["step"] >= 10)


def rewrite(src, dst, change):
    with safe_open(str(src), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(dst), metadata={"xc": json.dumps(meta)})
    return dst


@pytest.mark.parametrize("change, message", [
    (lambda m: m["matryoshka"].update(widths=[4, 8]), r"matryoshka.widths ends at 8, not at n_latents \(16\)"),
    (lambda m: m["matryoshka"].update(widths=[8, 4, 16]), "matryoshka.widths 8,4,16 must be strictly increasing"),
    (lambda m: m["matryoshka"].update(widths="4,8"), "matryoshka.widths '4,8' is not a list"),
    (lambda m: m["matryoshka"].update(weights=[1, 1]), "matryoshka.weights .* is not a list of 3 finite weights"),
    (lambda m: m["matryoshka"].update(weights=[1, -1, 1]), "matryoshka.weights"),
    (lambda m: m.update(matryoshka=[4, 8, 16]), "matryoshka .* is not an object of widths and weights"),
    (lambda m: m.update(arch="topk"), "a matryoshka record needs arch batchtopk"),
])
def test_a_bad_matryoshka_record_is_refused_naming_the_checkpoint(trained, tmp_path, change, message):
    bad = rewrite(trained, tmp_path / "bad.safetensors", change)
    with pytest.raises(BadInput, match=f"checkpoint '.*bad.safetensors'.*{message}"):
        xcli.load(bad)


class Crash(Exception):
    pass


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(store, trained, tmp_path):
    out = tmp_path / "x.safetensors"

    def crash(record):
        if record["kind"] == "train" and record["step"] == 25:
            raise Crash

    with pytest.raises(Crash):
        tr.train(config(store, out), on_log=crash)
    with pytest.raises(BadInput, match="--groups is"):  # other prefixes are another run
        tr.train(config(store, out, groups=(2, 16), resume=True))
    tr.train(config(store, out, resume=True))
    with safe_open(str(out), "pt") as a, safe_open(str(trained), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key


def test_a_run_recorded_before_groups_existed_resumes_as_before():
    saved = {k: v for k, v in config("s.zarr", "o").hyperparameters().items() if k != "groups"}
    now = {**saved, "arch": "batchtopk", "groups": None}
    tr.check_same_run({**saved, "arch": "batchtopk"}, now, "o")


# -- consumers ------------------------------------------------------------------------------------
# A Matryoshka checkpoint is a batchtopk one plus its record: every consumer must read it and give
# exactly what it gives for the same weights without the record.

def test_export_and_amplify_treat_it_as_the_batchtopk_crosscoder_it_is(tiny, tmp_path):
    spec = importlib.util.spec_from_file_location("export_helpers", ROOT / "tests" / "export" / "test_export.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    store = helpers.write_store(tmp_path / "acts.zarr", tiny, documents=4)
    model = helpers.sparse_crosscoder(helpers.sources_for(tiny), open_store(store), "batchtopk", 3)
    plain = crosscoder.save(model, tmp_path / "plain.safetensors")
    model.matryoshka = Prefixes.uniform((6, 24))
    nested = crosscoder.save(model, tmp_path / "nested.safetensors")
    assert xcli.load(nested).matryoshka.widths == (6, 24) and xcli.load(plain).matryoshka is None
    for ckpt in (plain, nested):
        result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "saelens", "-o", str(tmp_path / ckpt.stem)])
        assert result.exit_code == 0, result.output
    for source in model.sources:
        assert_same_files(tmp_path / "plain" / source.name / "sae_weights.safetensors",
                          tmp_path / "nested" / source.name / "sae_weights.safetensors")
    # Steering (xc amplify's library call), greedy: the same tokens.
    steered = []
    for ckpt in (plain, nested):
        cfg = SteerConfig(str(tiny["gpt2"]), str(ckpt), (2,), ("the cat sees",),
                          scales=(30.0,), sampling=Sampling(max_new_tokens=6, temperature=0), token_ids=True)
        steered.append([r["token_ids"] for r in steer(cfg)])
    assert steered[0] == steered[1] and steered[0][0]


def assert_same_files(a, b):
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert set(fa.keys()) == set(fb.keys())
        for key in fa.keys():
            assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), key


def test_classify_and_eval_read_a_trained_matryoshka_checkpoint(trained, store, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["eval", str(trained), str(store), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["l0"] > 0 and report["fvu_total"] < 1
    result = runner.invoke(cli, ["classify", str(trained), "-o", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "c.jsonl").read_text().splitlines()) >= 16
