"""xc classify: decoder-norm statistics, classes, the store pass, Latent Scaling, coherence, CLI."""

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import xcli
from xcli.analysis import classify as cl
from xcli.cli import cli
from xcli.crosscoder.model import Crosscoder, save
from xcli.data.store import StoreWriter, open_store
from xcli.errors import BadInput
from xcli.source import Source

D = 8
PAIR = [Source("base.resid_post.2", "base", "resid_post", 2, D), Source("chat.resid_post.2", "chat", "resid_post", 2, D)]


def orthonormal(n, d=D, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q[:, :n].T  # (n, d) orthonormal rows


def two_model_crosscoder(norms, cosines=None, arch="relu"):
    """Latent i has decoder norms norms[i] = (base, chat) and decoder cosine cosines[i]."""
    F = len(norms)
    m = Crosscoder(PAIR, F, arch, k=1 if arch != "relu" else None)
    u, w = orthonormal(2, seed=1)
    with torch.no_grad():
        for i, (na, nb) in enumerate(norms):
            c = 1.0 if cosines is None else cosines[i]
            m.decoder_weight(PAIR[0].name)[i] = torch.tensor(na * u, dtype=torch.float32)
            m.decoder_weight(PAIR[1].name)[i] = torch.tensor(nb * (c * u + np.sqrt(1 - c * c) * w),
                                                             dtype=torch.float32)
    return m


def write_store(path, sources, data, chunk_rows=16):
    w = StoreWriter(path, sources, dtype="float32", chunk_rows=chunk_rows)
    w.append({s.name: data[s.name].astype(np.float32) for s in sources})
    w.close()
    return open_store(path)


# -- the statistics and the classes ----------------------------------------------------

def test_relative_norm_and_delta_norm_documented_values():
    a = np.array([1, 0.2, 0, 0.5, 0.1, 1, 1])
    b = np.array([1, 1, 1, 1, 1, 0, 0.5])
    np.testing.assert_allclose(cl.relative_norm(a, b), [0.5, 1 / 1.2, 1, 2 / 3, 1 / 1.1, 0, 1 / 3])
    np.testing.assert_allclose(cl.relative_norm(0.2, 1), 0.8333, atol=5e-5)
    np.testing.assert_allclose(cl.delta_norm(a, b), [0.5, 0.9, 1, 0.75, 0.95, 0, 0.25])
    assert np.isnan(cl.relative_norm(0, 0)) and np.isnan(cl.delta_norm(0, 0))


def test_known_norms_give_documented_r_delta_cosine_and_class():
    norms = [(1, 1), (0.2, 1), (0.1, 1), (1, 0.1), (1, 0.5), (1, 0.4), (0, 0), (0.5, 0.5)]
    cosines = [1.0, 0.5, 0.0, -0.3, 0.8, 1.0, 1.0, -1.0]
    rows = list(cl.classify(two_model_crosscoder(norms, cosines)).rows())
    assert [r["latent"] for r in rows] == list(range(8))
    assert [r["class"] for r in rows] == ["shared", "mixed", "exclusive:chat", "exclusive:base", "shared", "mixed",
                                         "dead", "shared"]
    assert rows[0]["rel_norm_B_over_A"] == 0.5 and rows[0]["delta_norm_B_over_A"] == 0.5
    assert rows[1]["rel_norm_B_over_A"] == pytest.approx(0.8333, abs=5e-5)
    assert rows[1]["delta_norm_B_over_A"] == pytest.approx(0.9, abs=1e-6)
    assert rows[1]["norm"] == pytest.approx({"base": 0.2, "chat": 1.0})
    assert rows[1]["share"]["chat"] == pytest.approx(1 / 1.2, abs=1e-6)
    assert (rows[0]["model_A"], rows[0]["model_B"]) == ("base", "chat")
    for r, c in zip(rows, cosines):
        if r["class"] != "dead":
            assert r["cosine_A_B"] == pytest.approx(c, abs=1e-6)
    assert rows[6]["rel_norm_B_over_A"] is None and rows[6]["cosine_A_B"] is None
    json.dumps(rows)  # JSON-ready: no NaN


def test_models_option_reverses_orientation():
    rows = list(cl.classify(two_model_crosscoder([(0.2, 1)]), config=cl.ClassifyConfig(models=("chat", "base"))).rows())
    assert rows[0]["model_A"] == "chat" and rows[0]["rel_norm_B_over_A"] == pytest.approx(0.2 / 1.2, abs=1e-6)
    assert rows[0]["delta_norm_B_over_A"] == pytest.approx(0.1, abs=1e-6)


def test_thresholds_are_configurable():
    norms = [(0.2, 1), (1, 0.5)]
    config = cl.ClassifyConfig(exclusive_share=0.8, shared_band=(0.4, 0.6))
    assert cl.classify(two_model_crosscoder(norms), config=config).classes == ["exclusive:chat", "mixed"]


def test_more_than_two_models_use_norm_shares():
    srcs = [Source(f"{m}.resid.0", m, "resid", 0, 4) for m in ("a", "b", "c")]
    norms = [(0.92, 0.04, 0.04), (1, 1, 1), (1, 1, 0), (1, 0.5, 0.5), (0, 0, 0)]
    m = Crosscoder(srcs, len(norms), "relu")
    with torch.no_grad():
        for i, row in enumerate(norms):
            for s, n in zip(srcs, row):
                m.decoder_weight(s.name)[i, 0] = n
    result = cl.classify(m)
    # (1, 0.5, 0.5): min share 0.25 >= 2 * 0.3 / 3 = 0.2 -> shared; (1, 1, 0): min share 0 -> mixed
    assert result.classes == ["exclusive:a", "shared", "mixed", "shared", "dead"]
    rows = list(result.rows())
    assert "rel_norm_B_over_A" not in rows[0] and rows[0]["share"]["a"] == pytest.approx(0.92, abs=1e-6)
    paired = list(cl.classify(m, config=cl.ClassifyConfig(models=("c", "a"))).rows())
    assert paired[2]["rel_norm_B_over_A"] == 1.0 and paired[2]["class"] == "mixed"


def test_source_norms_within_a_group_and_group_norm_is_their_l2():
    srcs = [Source("a.resid.0", "a", "resid", 0, 4), Source("a.resid.1", "a", "resid", 1, 4),
            Source("b.resid.0", "b", "resid", 0, 4), Source("b.resid.1", "b", "resid", 1, 4)]
    m = Crosscoder(srcs, 1, "relu")
    with torch.no_grad():
        for s, n in zip(srcs, (3.0, 4.0, 1.0, 0.0)):
            m.decoder_weight(s.name)[0, 1] = n
    row = next(cl.classify(m).rows())
    assert row["source_norm"] == {"a.resid.0": 3.0, "a.resid.1": 4.0, "b.resid.0": 1.0, "b.resid.1": 0.0}
    assert row["norm"] == {"a": 5.0, "b": 1.0} and row["rel_norm_B_over_A"] == pytest.approx(1 / 6, abs=1e-6)
    assert row["layer_share"] == pytest.approx({"0": np.sqrt(10) / (np.sqrt(10) + 4), "1": 4 / (np.sqrt(10) + 4)})


def test_sources_that_do_not_correspond_give_no_cosine():
    srcs = [Source("a.resid.0", "a", "resid", 0, 4), Source("b.resid.0", "b", "resid", 0, 6)]
    result = cl.classify(Crosscoder(srcs, 2, "relu"))
    assert result.cosine is None and result.notes and "corresponding" in result.notes[0]


def test_one_model_cross_layer_profile_peak_and_span():
    srcs = [Source(f"m.resid.{layer}", "m", "resid", layer, 4) for layer in (0, 3, 6)]
    norms = [(1, 0, 0), (1, 2, 1), (0.05, 1, 1), (0, 0, 0)]
    m = Crosscoder(srcs, len(norms), "relu")
    with torch.no_grad():
        for i, row in enumerate(norms):
            for s, n in zip(srcs, row):
                m.decoder_weight(s.name)[i, 2] = n
    rows = list(cl.classify(m).rows())
    assert [r["class"] for r in rows] == ["exclusive:m", "exclusive:m", "exclusive:m", "dead"]
    assert rows[1]["layer_share"] == {"0": 0.25, "3": 0.5, "6": 0.25}
    assert [r["peak_layer"] for r in rows] == [0, 3, 3, None]
    assert [r["span_layers"] for r in rows] == [[0], [0, 3, 6], [3, 6], []]
    assert rows[2]["span"] == 2 and "rel_norm_B_over_A" not in rows[0]
    narrow = list(cl.classify(m, config=cl.ClassifyConfig(span_share=0.3)).rows())
    assert narrow[1]["span_layers"] == [3]


@pytest.mark.parametrize("kwargs", [dict(exclusive_share=0.5), dict(shared_band=(0.7, 0.3)), dict(nu_r=0),
                                    dict(dead_frequency=1), dict(span_share=0), dict(models=("a", "a")),
                                    dict(max_tokens=0)])
def test_bad_thresholds_are_bad_input(kwargs):
    with pytest.raises(BadInput):
        cl.ClassifyConfig(**kwargs)


def test_unknown_model_is_bad_input():
    with pytest.raises(BadInput, match="'nope'.*base, chat"):
        cl.classify(two_model_crosscoder([(1, 1)]), config=cl.ClassifyConfig(models=("base", "nope")))


# -- the store pass --------------------------------------------------------------------

def random_relu_crosscoder(srcs, F, seed=0):
    m = Crosscoder(srcs, F, "relu")
    m.init_weights(torch.Generator().manual_seed(seed), decoder_norm=0.5)
    with torch.no_grad():
        m.b_enc.normal_(-0.2, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        m.input_scale.copy_(torch.tensor([0.7, 1.3][: len(srcs)]))
    return m


def dense_latents(m, data):
    """f for every row, written out with numpy from the weights (an independent computation)."""
    pre = m.b_enc.detach().numpy().astype(np.float64)
    for s in m.sources:
        pre = pre + (data[s.name] * m.scale(s.name).item()) @ m.encoder_weight(s.name).detach().numpy()
    return np.maximum(pre, 0)


def test_frequency_mean_max_match_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    data = {s.name: rng.normal(size=(90, D)) for s in PAIR}
    store = write_store(tmp_path / "s.zarr", PAIR, data)
    m = random_relu_crosscoder(PAIR, 16)
    # batch_elements = 3 * F: three rows per batch, so batches and chunks do not line up.
    result = cl.classify(m, store, cl.ClassifyConfig(batch_elements=48, max_tokens=77))
    f = dense_latents(m, {n: x[:77] for n, x in data.items()})
    fires = f > 0
    np.testing.assert_allclose(result.activity["frequency"], fires.mean(0))
    with np.errstate(invalid="ignore"):
        mean = np.where(fires.any(0), f.sum(0) / fires.sum(0), np.nan)
    np.testing.assert_allclose(result.activity["mean_activation"], mean, rtol=1e-5)
    np.testing.assert_allclose(result.activity["max_activation"], f.max(0), rtol=1e-5)
    assert result.n_tokens == 77
    assert 0 < fires.mean() < 1  # the check is not vacuous


def test_latent_that_never_fires_is_dead(tmp_path):
    rng = np.random.default_rng(4)
    store = write_store(tmp_path / "s.zarr", PAIR, {s.name: rng.normal(size=(40, D)) for s in PAIR})
    m = random_relu_crosscoder(PAIR, 8)
    with torch.no_grad():
        m.b_enc[3] = -1e6
    result = cl.classify(m, store)
    assert result.classes[3] == "dead" and result.activity["frequency"][3] == 0
    assert "dead" not in result.classes[:3] + result.classes[4:]
    row = list(result.rows())[3]
    assert row["mean_activation"] is None and row["max_activation"] == 0


def test_batching_does_not_change_results(tmp_path):
    rng = np.random.default_rng(5)
    store = write_store(tmp_path / "s.zarr", PAIR, {s.name: rng.normal(size=(50, D)) for s in PAIR})
    m = random_relu_crosscoder(PAIR, 32)
    one_row = list(cl.classify(m, store, cl.ClassifyConfig(batch_elements=1)).rows())
    default = list(cl.classify(m, store).rows())
    assert [r["class"] for r in one_row] == [r["class"] for r in default]
    for a, b in zip(one_row, default):
        for key in ("frequency", "mean_activation", "max_activation", "nu_epsilon", "nu_r"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)


def planted_scaling_setup(n=200, seed=6):
    """Latents whose Latent Scaling betas are known exactly.

    Latent j reads coordinate j of base (f_j = relu(x_base[j])) and writes u_j into chat only
    (u_j orthonormal, orthogonal to the read coordinates). The stored activations are made to
    hold exactly c_j f_j along u_j in base and k_j f_j in chat, plus anything orthogonal to u_j:
    so beta_error[base] = c_j, beta_error[chat] = k_j, beta_reconstruction = (0, 1) exactly.
    Latent 2 has a twin, latent 3, that writes the same u_2 into base and fires identically:
    latent decoupling, beta_reconstruction[base] of latent 2 = 1.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(D, D)))[0].T
    basis[:3] = np.eye(D)[:3]  # the read coordinates
    basis = np.linalg.qr(basis.T)[0].T  # u_j orthogonal to e_0, e_1, e_2
    u = basis[3:6]
    c, k = np.array([0.05, 0.35, 0.0, 0.0]), np.array([1.0, 1.0, 0.8, 0.0])
    m = Crosscoder(PAIR, 4, "relu")
    with torch.no_grad():
        for j, coord in enumerate((0, 1, 2, 2)):
            m.encoder_weight(PAIR[0].name)[coord, j] = 1.0
        for j in range(3):
            m.decoder_weight(PAIR[1].name)[j] = torch.tensor(u[j], dtype=torch.float32)
        m.decoder_weight(PAIR[0].name)[3] = torch.tensor(u[2], dtype=torch.float32)
    v = {s.name: rng.normal(size=(n, D)) for s in PAIR}
    f = np.maximum(v[PAIR[0].name][:, :4][:, [0, 1, 2, 2]], 0)
    data = {}
    for s, scale in zip(PAIR, (c, k)):
        x = v[s.name].copy()
        for j in range(3):
            x += ((scale[j] * f[:, j] - x @ u[j])[:, None]) * u[j]
        data[s.name] = x
    return m, data, c, k


def test_latent_scaling_beta_is_exact_for_planted_scales(tmp_path):
    m, data, c, k = planted_scaling_setup()
    store = write_store(tmp_path / "s.zarr", PAIR, data)
    result = cl.classify(m, store, cl.ClassifyConfig(batch_elements=4 * 7))
    s = result.scaling
    assert result.classes[:3] == ["exclusive:chat"] * 3 and result.classes[3] == "exclusive:base"
    assert list(s["owner"][:3]) == [1, 1, 1]
    for j in range(2):
        np.testing.assert_allclose(s["beta_error"][j], [c[j], k[j]], atol=1e-5)
        np.testing.assert_allclose(s["beta_reconstruction"][j], [0, 1], atol=1e-5)
        assert s["nu_epsilon"][j] == pytest.approx(c[j] / k[j], abs=1e-5)
    np.testing.assert_allclose(s["beta_reconstruction"][2], [1, 1], atol=1e-5)  # the twin rebuilds u_2 in base
    assert s["verdict"][:3] == ["specific", "shrinkage", "decoupling"]
    row = list(result.rows())[1]
    assert row["ls_direction"] == "chat" and row["ls_verdict"] == "shrinkage"
    assert row["beta_error"] == pytest.approx({"base": c[1], "chat": k[1]}, abs=1e-5)


def test_beta_against_a_brute_force_least_squares_fit(tmp_path):
    """Random weights: each beta equals numpy's lstsq of the target on f_j d, latent by latent."""
    rng = np.random.default_rng(7)
    data = {s.name: rng.normal(size=(60, D)) for s in PAIR}
    store = write_store(tmp_path / "s.zarr", PAIR, data)
    m = random_relu_crosscoder(PAIR, 6, seed=2)
    with torch.no_grad():
        m.b_dec[0].normal_(generator=torch.Generator().manual_seed(9))
    s = cl.classify(m, store).scaling
    f = dense_latents(m, data)
    W = [m.decoder_weight(p.name).detach().numpy().astype(np.float64) for p in PAIR]
    xn = [data[p.name] * m.scale(p.name).item() for p in PAIR]
    recon = [f @ W[side] + m.decoder_bias(p.name).detach().numpy() for side, p in enumerate(PAIR)]
    for j in range(6):
        owner = int(np.linalg.norm(W[1][j]) > np.linalg.norm(W[0][j]))
        d = W[owner][j]
        design = (f[:, j:j + 1] * d).reshape(-1, 1)
        for side in (0, 1):
            own_term = np.outer(f[:, j], W[side][j])
            err = xn[side] - recon[side] + own_term
            rec = recon[side] if side == owner else recon[side] - own_term
            for target, got in ((err, s["beta_error"][j, side]), (rec, s["beta_reconstruction"][j, side])):
                expected = np.linalg.lstsq(design, target.reshape(-1), rcond=None)[0][0]
                assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)


def cross_layer_setup(tmp_path, n=64):
    srcs = [Source(f"m.resid.{layer}", "m", "resid", layer, 4) for layer in (0, 1, 2)]
    rng = np.random.default_rng(8)
    x = rng.normal(size=(n, 4))
    x[:, 0] = np.abs(x[:, 0]) + 0.1
    data = {s.name: x for s in srcs}  # the same row in every layer
    m = Crosscoder(srcs, 3, "relu")
    with torch.no_grad():
        m.encoder_weight(srcs[0].name)[0, 0] = 1.0  # latent 0: driven by layer 0 only
        for s in srcs:
            m.encoder_weight(s.name)[0, 1] = 1.0  # latent 1: driven equally by all three layers
            m.decoder_weight(s.name)[:, 1] = 1.0  # every latent writes to every layer
        m.encoder_weight(srcs[0].name)[0, 2] = 2.0  # latent 2: two layers, one twice as strong
        m.encoder_weight(srcs[2].name)[0, 2] = 1.0
    return m, write_store(tmp_path / "s.zarr", srcs, data), data


def test_functional_coherence_documented_values(tmp_path):
    m, store, _ = cross_layer_setup(tmp_path)
    rows = list(cl.classify(m, store).rows())
    # one layer -> 1; three equal layers -> 3; contributions 2:0:1 -> delta (2/3, 0, 1/3) -> 1.5
    assert [r["functional_coherence"] for r in rows] == pytest.approx([1.0, 3.0, 1.5], abs=1e-5)


def test_functional_coherence_matches_brute_force(tmp_path):
    srcs = [Source(f"m.resid.{layer}", "m", "resid", layer, 5) for layer in (0, 1, 2)]
    rng = np.random.default_rng(9)
    data = {s.name: rng.normal(size=(40, 5)) for s in srcs}
    store = write_store(tmp_path / "s.zarr", srcs, data)
    m = Crosscoder(srcs, 12, "relu")
    m.init_weights(torch.Generator().manual_seed(3), decoder_norm=0.5)
    with torch.no_grad():
        m.b_enc.fill_(0.05)
    got = cl.classify(m, store, cl.ClassifyConfig(batch_elements=12 * 3)).coherence
    f = dense_latents(m, data)
    deltas = []
    for s in srcs:
        masked = dense_latents(m, {**data, s.name: np.zeros_like(data[s.name])})
        deltas.append(np.abs(f - masked).sum(0) / (f.sum(0) + 1e-8))
    deltas = np.array(deltas)
    np.testing.assert_allclose(got, deltas.sum(0) / deltas.max(0), rtol=1e-4)


def test_store_without_a_needed_source_is_bad_input(tmp_path):
    other = [Source("base.resid_post.2", "base", "resid_post", 2, D)]
    store = write_store(tmp_path / "s.zarr", other, {other[0].name: np.zeros((4, D))})
    with pytest.raises(BadInput, match="chat.resid_post.2"):
        cl.classify(random_relu_crosscoder(PAIR, 4), store)


# -- the command line ------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "xc.safetensors"
    save(two_model_crosscoder([(1, 1), (0.2, 1), (0.05, 1), (1, 0.05), (0, 0)]), path)
    return path


def run(args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


def test_cli_jsonl_on_stdout_summary_on_stderr(checkpoint):
    result = run(["classify", checkpoint])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["class"] for r in rows] == ["shared", "mixed", "exclusive:chat", "exclusive:base", "dead"]
    assert rows[1]["rel_norm_B_over_A"] == pytest.approx(0.8333, abs=5e-5)
    assert "exclusive:chat" in result.stderr and "latents" in result.stderr
    quiet = run(["classify", checkpoint, "-q"])
    assert quiet.stdout == result.stdout and quiet.stderr == ""


def test_cli_reads_checkpoint_path_from_stdin_and_writes_csv(checkpoint):
    result = run(["classify", "-", "--format", "csv", "-q"], input=f"{checkpoint}\n")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    header = lines[0].split(",")
    assert header[:2] == ["latent", "class"] and "norm.chat" in header and "rel_norm_B_over_A" in header
    assert len(lines) == 6 and lines[3].startswith("2,exclusive:chat,")


def test_cli_table_format(checkpoint):
    result = run(["classify", checkpoint, "--format", "table", "-q"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["latent", "class", "norm.base"]
    assert lines[3].split()[:2] == ["2", "exclusive:chat"] and lines[5].split()[1] == "dead"


def test_cli_output_file_is_atomic_and_not_clobbered(checkpoint, tmp_path):
    out = tmp_path / "latents.jsonl"
    first = run(["classify", checkpoint, "-o", out, "-q"])
    assert first.exit_code == 0 and first.stdout.strip() == str(out)
    assert len(out.read_text().splitlines()) == 5
    again = run(["classify", checkpoint, "-o", out])
    assert again.exit_code == 2 and "--overwrite" in again.stderr and again.stdout == ""
    assert run(["classify", checkpoint, "-o", out, "--overwrite", "-q"]).exit_code == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_with_store_and_thresholds(tmp_path):
    m, data, c, k = planted_scaling_setup()
    ckpt = tmp_path / "xc.safetensors"
    save(m, ckpt)
    store = write_store(tmp_path / "s.zarr", PAIR, data).path
    result = run(["classify", ckpt, "--store", store, "--nu-epsilon", "0.4", "--max-tokens", "150"])
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["ls_verdict"] for r in rows] == ["specific", "specific", "decoupling", "undetermined"]
    assert rows[0]["frequency"] > 0 and "Latent Scaling" in result.stderr


@pytest.mark.parametrize("args,needle", [
    (["--models", "base,nope"], "nope"),
    (["--models", "base"], "--models"),
    (["--shared-band", "0.3"], "--shared-band"),
    (["--shared-band", "a,b"], "--shared-band"),
    (["--exclusive-share", "1.5"], "--exclusive-share"),
    (["--store", "/no/such.zarr"], "/no/such.zarr"),
    (["--max-tokens", "10"], "--store"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_cli_bad_input_is_one_line_exit_2(checkpoint, args, needle):
    result = run(["classify", checkpoint, *args])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.stderr


def test_cli_missing_checkpoint_is_exit_2(tmp_path):
    result = run(["classify", tmp_path / "nope.safetensors"])
    assert result.exit_code == 2 and "nope.safetensors" in result.stderr


def test_cli_plot_without_matplotlib_is_exit_2(checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run(["classify", checkpoint, "--plot", tmp_path / "figs"])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "xcli[plot]" in result.stderr
    assert not (tmp_path / "figs").exists()


def test_cli_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    m, data, *_ = planted_scaling_setup()
    ckpt = tmp_path / "xc.safetensors"
    save(m, ckpt)
    store = write_store(tmp_path / "s.zarr", PAIR, data).path
    figs = tmp_path / "figs"
    result = run(["classify", ckpt, "--store", store, "--plot", figs, "-q"])
    assert result.exit_code == 0, result.stderr
    written = sorted(p.name for p in figs.iterdir())
    assert written == ["latent_scaling.png", "relative_norm.png"]  # no shared latent: no cosine figure
    assert all((figs / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in written)
    again = run(["classify", ckpt, "--plot", figs])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_cli_cross_layer_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    m, store, _ = cross_layer_setup(tmp_path)
    ckpt = tmp_path / "xc.safetensors"
    save(m, ckpt)
    result = run(["classify", ckpt, "--store", store.path, "--plot", tmp_path / "figs", "-q"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["layer_profiles.png"]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[1]["functional_coherence"] == pytest.approx(3.0, abs=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pass_matches_cpu(tmp_path):
    m, data, *_ = planted_scaling_setup()
    store = write_store(tmp_path / "s.zarr", PAIR, data)
    on_cpu = list(cl.classify(m, store).rows())
    on_gpu = list(cl.classify(m, store, cl.ClassifyConfig(device="cuda")).rows())
    assert [r["class"] for r in on_gpu] == [r["class"] for r in on_cpu]
    for a, b in zip(on_gpu, on_cpu):
        assert a["nu_epsilon"] == pytest.approx(b["nu_epsilon"], rel=1e-4, abs=1e-5)
        assert a["frequency"] == b["frequency"]


# -- end to end: train on planted data, then classify -------------------------------------

WEAK = 0.4  # feature 0 is shared, but 0.4 times weaker in b, along the same direction


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A two-model synthetic store (8 shared, 4 + 4 exclusive features in 16 dims, plus feature 0
    shared but weak in b) and a ReLU crosscoder trained on it, whose L1 penalty shrinks the weak
    side of feature 0 to zero: the Complete Shrinkage of Minder et al."""
    import dataclasses

    from xcli.data import synth
    from xcli.train import loop as tr

    folder = tmp_path_factory.mktemp("planted")
    truth = synth.plant(["a", "b"], {"a": 16, "b": 16}, n_shared=8, n_exclusive=4, active=3.0, decay=1.0,
                        rng=np.random.default_rng([3, 0]))
    decoders = {n: v.copy() for n, v in truth.decoders.items()}
    decoders["b"][0] = WEAK * decoders["a"][0]
    truth = dataclasses.replace(truth, decoders=decoders)
    writer = StoreWriter(folder / "s.zarr", [Source(n, n, "synthetic", None, 16) for n in truth.names],
                         dtype="float32", chunk_rows=1024)
    for block, start in enumerate(range(0, 8192, 4096)):
        writer.append(synth.sample(truth, 4096, (0.5, 1.5), 0.0, np.random.default_rng([3, 1, block]))[1])
    writer.close()
    path = tr.train(tr.TrainConfig(stores=(str(folder / "s.zarr"),), output=str(folder / "x.safetensors"),
                                   arch="relu", l1=2.0, latents=32, batch_size=256, tokens=3 * 8192,
                                   eval_fraction=0.05, dead_tokens=5000, shuffle_buffer=4096,
                                   checkpoint_every=10_000, device="cpu"))
    model = xcli.load(path)
    found = synth.match(truth, model)
    result = cl.classify(model, open_store(folder / "s.zarr"))
    return truth, found, result, path, folder / "s.zarr"


def test_classes_match_planted_labels_of_recovered_features(planted):
    truth, found, result, *_ = planted
    recovered = [g for g in range(1, truth.n_features) if found.cosine[g] > 0.9]  # feature 0 is the weak one
    assert len(recovered) >= 10  # most of the 15 clean features
    agree = [result.classes[found.latent[g]] == truth.kinds[g] for g in recovered]
    assert np.mean(agree) >= 0.95
    assert {truth.kinds[g] for g in recovered} == {"shared", "exclusive:a", "exclusive:b"}
    exclusive = [g for g in recovered if truth.kinds[g].startswith("exclusive")]
    assert all(result.scaling["verdict"][found.latent[g]] == "specific" for g in exclusive)


def test_latent_scaling_flags_a_shared_feature_that_looks_exclusive(planted):
    truth, found, result, *_ = planted
    j = found.latent[0]
    assert found.cosine[0] > 0.9 and result.classes[j] == "exclusive:a"  # looks exclusive after training
    assert result.rel_norm[j] < 0.02  # the L1 penalty shrank its b side to (almost) nothing
    assert result.scaling["nu_epsilon"][j] > 0.2  # b's error still holds the direction
    assert result.scaling["verdict"][j].startswith("shrinkage")


def test_cli_on_a_trained_checkpoint_with_plots(planted, tmp_path):
    pytest.importorskip("matplotlib")
    *_, path, store = planted
    result = run(["classify", path, "--store", store, "--plot", tmp_path / "figs", "--format", "csv",
                  "-o", tmp_path / "latents.csv", "-q"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "cosine_shared.png", "latent_scaling.png", "relative_norm.png"]
    assert len((tmp_path / "latents.csv").read_text().splitlines()) == 33


def test_xc_export_reads_the_rows(checkpoint, tmp_path):
    from xcli.export.neuronpedia import read_classes

    out = tmp_path / "latents.jsonl"
    assert run(["classify", checkpoint, "-o", out, "-q"]).exit_code == 0
    rows = read_classes(out, 5)
    assert [rows[i]["class"] for i in range(5)] == ["shared", "mixed", "exclusive:chat", "exclusive:base", "dead"]
