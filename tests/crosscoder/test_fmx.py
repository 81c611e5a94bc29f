"""fmxcoders: factorizations against brute force, gradients, layer masking, checkpoints, resume,
functional coherence and bad input."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import xcli
from xcli.analysis.coherence import functional_coherence
from xcli.cli import cli
from xcli.crosscoder import fmx
from xcli.crosscoder.model import Crosscoder
from xcli.data import synth
from xcli.data.store import StoreWriter, open_store
from xcli.source import Source
from xcli.train import loop as tr

LAYERS = [Source(f"m.resid.{layer}", "m", "resid", layer, 5) for layer in range(3)]


def brute_force(factorization, layer, activation, latent):
    """W[l, a, i] entry by entry, straight from the definitions (differentiable)."""
    L, d, F = layer.shape[0], activation.shape[0], latent.shape[0]
    entries = []
    for l in range(L):
        for a in range(d):
            for i in range(F):
                if factorization == "tr":
                    entries.append(torch.trace(layer[l] @ activation[a] @ latent[i]))
                else:
                    entries.append((layer[l] * activation[a] * latent[i]).sum())
    return torch.stack(entries).view(L, d, F)


def random_fmx(factorization, ranks, arch="relu", k=None, seed=0):
    torch.manual_seed(seed)
    m = fmx.FmxCrosscoder(LAYERS, 7, arch, k, factorization=factorization, ranks=ranks)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        m.input_scale.copy_(torch.tensor([1.5, 0.7, 1.1]))
    g = torch.Generator().manual_seed(seed + 1)
    return m.train(), {s.name: torch.randn(6, s.d, generator=g) for s in LAYERS}


@pytest.mark.parametrize("factorization,ranks", [("tr", (2, 3, 4)), ("cp", (4,))])
def test_effective_tensors_equal_a_brute_force_contraction_of_the_factors(factorization, ranks):
    m, _ = random_fmx(factorization, ranks)
    for part, names, weight in (("enc", m.read, m.encoder_weight), ("dec", m.write, m.decoder_weight)):
        factors = getattr(m, part)
        expected = brute_force(factorization, factors.layer, factors.activation, factors.latent)
        for l, name in enumerate(names):
            w = weight(name)
            assert torch.allclose(w if part == "enc" else w.T, expected[l], atol=1e-5)
    assert m.encoder_weight("m.resid.0").shape == (5, 7) and m.decoder_weight("m.resid.0").shape == (7, 5)


@pytest.mark.parametrize("factorization,ranks", [("tr", (2, 3, 2)), ("cp", (3,))])
def test_gradients_reach_the_factors_and_equal_those_of_a_brute_force_model(factorization, ranks):
    m, x = random_fmx(factorization, ranks)
    parts = tr.loss_parts(m, x, 0.0, torch.zeros(7, dtype=torch.bool), 0)
    parts.loss.backward()
    # The same loss written out by hand from brute-force tensors of copies of the factors.
    copies = {name: p.detach().clone().requires_grad_(True) for name, p in m.named_parameters()}
    W_enc = brute_force(factorization, copies["enc.layer"], copies["enc.activation"], copies["enc.latent"])
    W_dec = brute_force(factorization, copies["dec.layer"], copies["dec.activation"], copies["dec.latent"])
    scale = m.input_scale
    pre = copies["b_enc"] + sum((x[s.name] * scale[l]) @ W_enc[l] for l, s in enumerate(LAYERS))
    f = torch.relu(pre)
    loss = sum(((x[s.name] * scale[l]) - (f @ W_dec[l].T + copies[f"b_dec.{l}"])).pow(2).sum()
               for l, s in enumerate(LAYERS)) / 6
    loss.backward()
    assert torch.allclose(parts.loss, loss)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, copies[name].grad, atol=1e-5, rtol=1e-4), name


def test_the_effective_tensors_follow_optimizer_steps_and_edits():
    """Fused Adam updates in place without bumping tensor versions; the cache must still follow."""
    m, x = random_fmx("tr", (2, 2, 2), arch="topk", k=2)
    opt = tr.make_optimizer(m, 0.05)
    for _ in range(3):
        before = m.decoder_weight("m.resid.1").detach().clone()
        parts = tr.loss_parts(m, x, 0.0, torch.zeros(7, dtype=torch.bool), 0)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
        fresh = m.dec.tensor()[1].T
        assert not torch.equal(before, fresh)
        assert torch.equal(m.decoder_weight("m.resid.1"), fresh)
        with torch.no_grad():
            assert torch.equal(m.decoder_weight("m.resid.1"), fresh)
    with torch.no_grad():
        m.enc.latent.mul_(2)
    assert torch.equal(m.encoder_weight("m.resid.2"), m.enc.tensor()[2])
    copied = copy.deepcopy(m)  # a copy follows its own steps
    opt = tr.make_optimizer(copied, 0.05)
    for _ in range(2):
        parts = tr.loss_parts(copied, x, 0.0, torch.zeros(7, dtype=torch.bool), 0)
        opt.zero_grad()
        parts.loss.backward()
        opt.step()
        assert torch.equal(copied.decoder_weight("m.resid.0"), copied.dec.tensor()[0].T)
    assert not torch.equal(copied.decoder_weight("m.resid.0"), m.decoder_weight("m.resid.0"))


# -- stochastic layer masking ----------------------------------------------------------------------

def test_layer_masking_draws_independent_bernoulli_masks_from_the_seed_and_step():
    keep = fmx.layer_keep(40_000, 4, 0.05, seed=7, step=3)
    masked = (~keep).float().mean(0)
    sigma = (0.05 * 0.95 / 40_000) ** 0.5
    assert ((masked - 0.05).abs() < 4 * sigma).all()  # each layer's rate is p
    both = (~keep[:, 0] & ~keep[:, 1]).float().mean()
    assert abs(float(both) - 0.05 ** 2) < 4 * (0.0025 / 40_000) ** 0.5  # independent across layers
    assert torch.equal(keep, fmx.layer_keep(40_000, 4, 0.05, seed=7, step=3))
    assert not torch.equal(keep, fmx.layer_keep(40_000, 4, 0.05, seed=7, step=4))
    assert not torch.equal(keep, fmx.layer_keep(40_000, 4, 0.05, seed=8, step=3))
    assert fmx.layer_keep(100, 3, 0.0, 0, 0).all()


def test_masking_zeroes_exactly_the_chosen_inputs_and_never_the_targets(monkeypatch):
    m, x = random_fmx("cp", (3,), arch="batchtopk", k=2)
    x = {n: v.repeat(20, 1) for n, v in x.items()}  # 120 rows
    cfg = tr.TrainConfig(stores=("unused",), output="unused", arch="fmx", k=2, latents=7, steps=10, warmup=0,
                         lr=1e-3, k_aux=0, dead_tokens=10**7, mask_prob=0.3, seed=5, device="cpu")
    seen = {}
    real_loss_parts = tr.loss_parts

    def spy(model, x_target, l1, dead, k_aux, x_in=None, *rest):
        seen["target"], seen["input"] = x_target, x_in
        return real_loss_parts(model, x_target, l1, dead, k_aux, x_in, *rest)

    monkeypatch.setattr(tr, "loss_parts", spy)
    state = tr.TrainState(step=4, since_fired=torch.zeros(7, dtype=torch.int64))
    m_copy = fmx.FmxCrosscoder(LAYERS, 7, "batchtopk", 2, factorization="cp", ranks=(3,))
    m_copy.load_state_dict(m.state_dict())
    parts = tr.train_step(m, tr.make_optimizer(m, 1e-3), x, state, cfg, None)
    keep = fmx.layer_keep(120, 3, 0.3, seed=5, step=4)
    assert seen["target"] is x  # the loss targets the clean activations
    for j, name in enumerate(m.read):
        assert torch.equal(seen["input"][name][~keep[:, j]], torch.zeros(int((~keep[:, j]).sum()), 5))
        assert torch.equal(seen["input"][name][keep[:, j]], x[name][keep[:, j]])
    assert 0 < (~keep).sum() < keep.numel()
    # The error is measured against clean targets: recompute it from the masked encoding.
    out = m_copy.train()(fmx.mask_layers(x, m.read, keep))
    for name in m.write:
        expected = ((x[name] * m_copy.scale(name)) - out.reconstruction[name]).pow(2).sum()
        assert torch.allclose(parts.sq_err[name], expected, rtol=1e-5)


# -- training, checkpoints, resume -----------------------------------------------------------------

NAMES = ["m.resid.0", "m.resid.1", "m.resid.2"]


@pytest.fixture(scope="module")
def layer_store(tmp_path_factory):
    """Three layers of one model, width 6, 2048 rows of planted sparse features."""
    path = tmp_path_factory.mktemp("layers") / "layers.zarr"
    truth = synth.plant(NAMES, {n: 6 for n in NAMES}, 4, 2, 2.0, 1.0, np.random.default_rng(3))
    _, acts = synth.sample(truth, 2048, (0.5, 1.5), 0.0, np.random.default_rng(4))
    writer = StoreWriter(path, [Source(n, "m", "resid", layer, 6) for layer, n in enumerate(NAMES)],
                         dtype="float32", chunk_rows=128)
    writer.append(acts, tokens=np.arange(2048) % 11)
    writer.close()
    return path


def config(store, out, **overrides):
    base = dict(stores=(str(store),), output=str(out), arch="fmx", latents=16, k=2, batch_size=64, steps=40,
                checkpoint_every=10, log_every=5, eval_fraction=0.125, dead_tokens=256, shuffle_buffer=256,
                device="cpu")
    return tr.TrainConfig(**{**base, **overrides})


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("factorization,ranks,arch", [("tr", None, "fmx"), ("cp", (5,), "fmx-topk")])
def test_checkpoint_holds_effective_tensors_and_factors(layer_store, tmp_path, factorization, ranks, arch):
    # Without held-out rows nothing re-encodes before the final save: the factors' last step must show anyway.
    path = tr.train(config(layer_store, tmp_path / "x.safetensors", factorization=factorization, ranks=ranks,
                           arch=arch, eval_fraction=0.0 if arch == "fmx-topk" else 0.125))
    t = tensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
    names = NAMES
    # A plain safetensors reader sees the contract's tensors, and the factors reproduce them.
    for part, key in (("encoder", "encoder"), ("decoder", "decoder")):
        W = brute_force(factorization, t[f"fmx.{part}.layer"], t[f"fmx.{part}.activation"], t[f"fmx.{part}.latent"])
        for l, name in enumerate(names):
            stored = t[f"{key}.{name}"]
            assert torch.allclose(stored if part == "encoder" else stored.T, W[l], atol=1e-5)
    assert meta["arch"] == ("batchtopk" if arch == "fmx" else "topk")  # what consumers select with
    assert meta["hyperparameters"]["arch"] == arch and meta["hyperparameters"]["mask_prob"] == 0.05
    expected_ranks = [5] if factorization == "cp" else [5, 5, 5]  # default: ceil(sqrt(3 layers * 6))
    assert meta["fmx"]["factorization"] == factorization and meta["fmx"]["ranks"] == expected_ranks
    assert meta["hyperparameters"]["ranks"] == expected_ranks
    assert sorted(meta["fmx"]["tensors"]) == sorted(k for k in t if k.startswith("fmx."))
    assert meta["fmx"]["encoder_layers"] == names and meta["fmx"]["d"] == 6
    # xcli.load gives a plain, working Crosscoder; load_factors the factorized one; they agree.
    plain, factored = xcli.load(path), fmx.load_factors(path)
    assert type(plain) is Crosscoder and isinstance(factored, fmx.FmxCrosscoder)
    x = {n: torch.randn(32, 6, generator=torch.Generator().manual_seed(1)) for n in names}
    with torch.no_grad():
        f_plain, f_factored = plain.encode(x), factored.encode(x)
        assert (f_plain != 0).any()
        assert torch.allclose(f_plain, f_factored, atol=1e-5)
        for name in names:
            assert torch.allclose(plain.decode(f_plain)[name], factored.decode(f_factored)[name], atol=1e-5)
    with pytest.raises(xcli.BadInput, match="not an fmx checkpoint"):
        fmx.load_factors(tr.train(config(layer_store, tmp_path / "plain.safetensors", arch="topk", steps=2)))


def test_xc_classify_reports_the_coherence_of_an_fmx_checkpoint(layer_store, tmp_path):
    path = tr.train(config(layer_store, tmp_path / "x.safetensors", steps=20))
    result = CliRunner().invoke(cli, ["classify", str(path), "--store", str(layer_store), "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    store = open_store(layer_store)
    expected = functional_coherence(xcli.load(path), [store.read_rows(0, 1000, NAMES),
                                                      store.read_rows(1000, 2048, NAMES)])
    got = np.array([np.nan if r.get("functional_coherence") is None else r["functional_coherence"] for r in rows])
    assert np.isfinite(expected.coherence).sum() > 4
    assert np.allclose(got, expected.coherence, equal_nan=True, rtol=1e-6)


def test_fmx_resume_ends_with_exactly_the_weights_of_an_uninterrupted_run(layer_store, tmp_path):
    reference = tr.train(config(layer_store, tmp_path / "ref.safetensors", mask_prob=0.2))
    out = tmp_path / "x.safetensors"

    class Crash(Exception):
        pass

    def crash_at(record):
        if record["kind"] == "train" and record["step"] == 25:
            raise Crash

    with pytest.raises(Crash):
        tr.train(config(layer_store, out, mask_prob=0.2), on_log=crash_at)
    assert torch.load(tr.state_path(out), weights_only=True)["step"] == 20
    with pytest.raises(xcli.BadInput, match="--mask-prob"):
        tr.train(config(layer_store, out, mask_prob=0.1, resume=True))
    tr.train(config(layer_store, out, mask_prob=0.2, resume=True))
    a, b = tensors(out), tensors(reference)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Masking changes the run: the same seed without it ends elsewhere.
    unmasked = tensors(tr.train(config(layer_store, tmp_path / "p0.safetensors", mask_prob=0.0)))
    assert not torch.equal(unmasked["fmx.encoder.latent"], a["fmx.encoder.latent"])


def test_cli_trains_an_fmx_crosscoder_and_prints_only_the_path(layer_store, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(layer_store), "-o", str(out), "--arch", "fmx-relu",
                                      "--factorization", "tr", "--ranks", "3,4,2", "--mask-prob", "0.1",
                                      "--latents", "16", "--batch-size", "64", "--steps", "5", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    meta = xcli.load(out).metadata
    assert meta["arch"] == "relu" and meta["fmx"]["ranks"] == [3, 4, 2]
    assert meta["hyperparameters"]["mask_prob"] == 0.1 and meta["hyperparameters"]["l1"] == 2.0


@pytest.mark.parametrize("args,message", [
    (["--sources", "m.resid.0"], "at least two sources to read"),
    (["--ranks", "4"], "--factorization and --ranks apply to --arch fmx"),
    (["--arch", "fmx", "--ranks", "4,4"], "--ranks 4,4 does not fit --factorization tr"),
    (["--arch", "fmx", "--factorization", "cp", "--ranks", "4,4,4"], "does not fit --factorization cp"),
    (["--arch", "fmx", "--ranks", "0"], "positive whole numbers"),
    (["--arch", "fmx", "--ranks", "big"], "not a comma-separated list of whole numbers"),
    (["--arch", "fmx", "--factorization", "tucker"], "'tucker' is not one of"),
    (["--arch", "fmx", "--mask-prob", "1"], "--mask-prob 1.0 must be at least 0 and below 1"),
    (["--mask-prob", "-0.1"], "--mask-prob -0.1 must be at least 0"),
    (["--arch", "fmx-relu", "--k", "3"], "--k applies to"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(layer_store, tmp_path, args, message):
    if "--arch" not in args:
        args = ["--arch", "fmx", *args] if "--sources" in args else args
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["train", str(layer_store), "-o", str(out), "--latents", "40",
                                      "--batch-size", "64", "--steps", "3", "--device", "cpu", *args])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sources_of_different_widths_are_refused(tmp_path):
    store = tmp_path / "mixed.zarr"
    synth.make_store(store, n_tokens=256, sources=("a", "b"), d={"a": 6, "b": 4}, n_shared=2, n_exclusive=1,
                     active=1.0, chunk_rows=128)
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--arch", "fmx", "--latents", "8",
                                      "--k", "2", "--batch-size", "64", "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "xc: error: --arch fmx factorizes over layers of one width (one model); the sources have widths "
        "a (6), b (4): choose sources of one width with --sources"], result.stderr
    assert not out.exists()


# -- functional coherence --------------------------------------------------------------------------

def test_functional_coherence_matches_re_encoding_with_each_layer_zeroed():
    sources = [Source(f"{model}.resid.{layer}", model, "resid", layer, 4)
               for model in ("a", "b") for layer in (0, 1, 2)]
    torch.manual_seed(0)
    m = Crosscoder(sources, 9, "topk", 3)
    m.init_weights(torch.Generator().manual_seed(1), decoder_norm=0.7)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.1)
        m.input_scale.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(2)
    x = {s.name: torch.randn(50, 4, generator=g) for s in sources}
    result = functional_coherence(m.train(), [{n: v[:20] for n, v in x.items()}, {n: v[20:] for n, v in x.items()}])
    assert m.training  # the mode is restored
    with torch.no_grad():
        m.eval()
        f = m.encode(x).double()
        delta = []
        for layer in (0, 1, 2):  # both models' layer zeroed together
            zeroed = {n: torch.zeros_like(v) if n.endswith(f".{layer}") else v for n, v in x.items()}
            delta.append(((f - m.encode(zeroed).double()).abs().sum(0) / (f.sum(0) + 1e-8)).numpy())
    delta = np.array(delta)
    live = f.sum(0).numpy() > 0
    assert live.sum() > 3
    assert np.allclose(result.coherence[live], (delta.sum(0) / delta.max(0))[live])
    assert np.allclose(result.frequency, (f > 0).double().mean(0).numpy())
    assert result.mean() == pytest.approx(float(np.mean(result.coherence[live])))
    assert result.layers == [0, 1, 2] and result.n_tokens == 50


def test_coherence_is_one_for_a_latent_read_from_one_layer_and_L_for_equal_layers():
    sources = [Source(f"s{j}", "m", "resid", j, 2) for j in range(4)]
    m = Crosscoder(sources, 2, "relu")
    with torch.no_grad():
        for name in m.read:
            m.encoder_weight(name).zero_()
            m.encoder_weight(name)[0, 1] = 1.0  # latent 1 reads coordinate 0 of every layer
        m.encoder_weight("s2")[1, 0] = 1.0  # latent 0 reads layer 2 only
    result = functional_coherence(m, [{name: torch.ones(10, 2) for name in m.read}])
    assert result.coherence[0] == pytest.approx(1.0) and result.coherence[1] == pytest.approx(4.0)
    unlayered = Crosscoder([Source(f"s{j}", "m", "resid", None, 2) for j in range(2)], 2, "relu")
    with pytest.raises(xcli.BadInput, match="two or more layers"):
        functional_coherence(unlayered, [])
