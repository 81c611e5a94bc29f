"""xc synth: the planted geometry, the rows it writes, determinism, the command line, and recovery."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from xcli.analysis.evaluate import EvalConfig, evaluate
from xcli.cli import cli
from xcli.data import synth
from xcli.data.store import open_store
from xcli.data.synth import PRESETS
from xcli.errors import BadInput
from xcli.train import loop as tr


def cosine(u, v):
    return (u * v).sum(-1) / np.linalg.norm(u, axis=-1) / np.linalg.norm(v, axis=-1)


# -- the spec ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    (dict(models=()), "--models"),
    (dict(models=("a", "a")), "repeats"),
    (dict(models=("a b",)), "not valid"),
    (dict(shared=0, exclusive=0), "no feature"),
    (dict(models=("m",), scaled=2), "two or more"),
    (dict(scaled=1, scale=1.0), "--scale"),
    (dict(layers=3, span=(2, 5)), "--span"),
    (dict(width=3, drift=10), "--width"),
    (dict(frequencies="zipf:x"), "--frequencies"),
    (dict(frequencies="gauss"), "--frequencies"),
    (dict(active=200), "--active"),
    (dict(frequencies="exponential:0.5", active=3), "--active"),
    (dict(correlation=1.0), "--correlation"),
    (dict(magnitude=(2, 1)), "--magnitude"),
    (dict(model_angle=120), "--model-angle"),
    (dict(noise=float("nan")), "--noise nan must be finite"),
    (dict(magnitude=(0.5, float("inf"))), "--magnitude 0.5,inf must be finite"),
    (dict(drift=float("nan")), "--drift nan must be finite"),
])
def test_bad_specs_are_refused(fields, message):
    with pytest.raises(BadInput, match=message.replace("-", r"\-")):
        synth.SynthSpec(**fields)


def test_frequencies_follow_the_chosen_distribution():
    g = np.arange(6)
    np.testing.assert_allclose(synth.frequency_weights("exponential:0.9", 6), 0.9 ** g)
    np.testing.assert_allclose(synth.frequency_weights("zipf:1.5", 6), 1 / (g + 1) ** 1.5)
    spec = synth.SynthSpec(shared=20, exclusive=5, frequencies="zipf:1", active=3.0)
    truth = synth.plant_spec(spec, np.random.default_rng(0))
    assert truth.frequency.sum() == pytest.approx(3.0)
    expected = synth.frequency_weights("zipf:1", spec.n_features) / synth.frequency_weights(
        "zipf:1", spec.n_features).sum() * 3
    np.testing.assert_allclose(np.sort(truth.frequency), np.sort(expected))  # the same values, shuffled
    assert not np.all(np.diff(truth.frequency) <= 0)


def test_planted_geometry():
    """Spans, drift, the angle between models, and the norms of each kind, exactly as specified."""
    spec = synth.SynthSpec(models=("a", "b"), layers=5, width=16, shared=6, exclusive=2, scaled=2, scale=0.4,
                           model_angle=30, drift=20, span=(2, 4), active=2)
    truth = synth.plant_spec(spec, np.random.default_rng(1))
    assert truth.names == tuple(f"{m}.synthetic.{layer}" for m in "ab" for layer in range(5))
    lengths = truth.span_lengths()
    assert lengths.min() >= 2 and lengths.max() <= 4 and (truth.spans[:, 0] >= 0).all()
    assert (truth.spans[:, 1] < 5).all()
    kinds = np.array(truth.kinds)
    for g in range(truth.n_features):
        first, last = truth.spans[g]
        for m in "ab":
            rows = np.stack([truth.decoders[f"{m}.synthetic.{layer}"][g] for layer in range(5)])
            norms = np.linalg.norm(rows, axis=1)
            inside = (np.arange(5) >= first) & (np.arange(5) <= last)
            assert (norms[~inside] == 0).all()
            expected = {"shared": 1.0, f"exclusive:{m}": 1.0, f"scaled:{m}": 0.4}.get(
                kinds[g], 0.0 if kinds[g].startswith("exclusive") else 1.0)
            np.testing.assert_allclose(norms[inside], expected, atol=1e-12)
            if expected:  # the direction turns by 20 degrees per layer inside the span
                np.testing.assert_allclose(cosine(rows[first:last], rows[first + 1:last + 1]),
                                           np.cos(np.radians(20)), atol=1e-12)
                np.testing.assert_allclose(cosine(rows[first], rows[last]),
                                           np.cos(np.radians(20 * (last - first))), atol=1e-12)
        if not kinds[g].startswith("exclusive"):  # 30 degrees between the models at every layer
            a, b = truth.decoders[f"a.synthetic.{first}"][g], truth.decoders[f"b.synthetic.{first}"][g]
            assert cosine(a, b) == pytest.approx(np.cos(np.radians(30)), abs=1e-12)
    assert truth.model_norms().shape == (truth.n_features, 2)


# -- the rows ------------------------------------------------------------------------------------------------

def coefficients(store_path, truth):
    """Least-squares coefficients of every row on the planted directions (all sources concatenated)."""
    store = open_store(store_path)
    x = np.concatenate([store.read(n, 0, store.n_tokens) for n in truth.names], axis=1).astype(np.float64)
    D = np.concatenate([truth.decoders[n] for n in truth.names], axis=1)  # (G, total width)
    c, *_ = np.linalg.lstsq(D.T, x.T, rcond=None)
    return store, x, D, c.T


def test_rows_are_sparse_sums_of_the_planted_features(tmp_path):
    spec = synth.SynthSpec(models=("a", "b"), width=16, shared=4, exclusive=2, scaled=1, active=2.0,
                           magnitude=(0.5, 1.5), frequencies="exponential:0.8", tokens=20000, seed=5)
    truth = synth.generate(spec, tmp_path / "s.zarr", chunk_rows=1000)
    store, x, D, c = coefficients(tmp_path / "s.zarr", truth)
    np.testing.assert_allclose(c @ D, x, atol=1e-5)  # no noise: exactly in the span of the features
    fires = c > 1e-4
    assert (np.abs(c[~fires]) < 1e-4).all() and (c[fires] > 0.5 - 1e-4).all() and (c[fires] < 1.5 + 1e-4).all()
    p, n = truth.frequency, len(c)
    assert np.all(np.abs(fires.mean(0) - p) < 5 * np.sqrt(p * (1 - p) / n))
    tokens = store.token_arrays()["tokens"]
    np.testing.assert_array_equal(tokens, np.where(fires.any(1), c.argmax(1) + 1, 0))
    meta = store.meta["synthetic"]
    assert meta["truth"] == "s.zarr.truth.safetensors" and meta["models"] == ["a", "b"]
    assert [s.model for s in store.sources] == ["a", "b"] and store.sources[0].layer == 0


def test_correlated_features_fire_together_and_keep_their_rates(tmp_path):
    spec = synth.SynthSpec(models=("a",), width=24, shared=8, exclusive=0, active=2.0, correlation=0.8,
                           group_size=2, tokens=20000, seed=2)
    truth = synth.generate(spec, tmp_path / "c.zarr", chunk_rows=5000)
    _, _, _, c = coefficients(tmp_path / "c.zarr", truth)
    fires = c > 1e-4
    p, n = truth.frequency, len(c)
    assert np.all(np.abs(fires.mean(0) - p) < 5 * np.sqrt(p * (1 - p) / n))
    groups = np.random.default_rng([2, 2]).permutation(8) // 2
    together = (fires[:, :, None] & fires[:, None, :]).mean(0)
    expected = np.outer(p, p)
    same = (groups[:, None] == groups[None, :]) & ~np.eye(8, dtype=bool)
    assert (together[same] > 2 * expected[same]).all()  # p = 0.25 each: about 0.16 together vs 0.0625
    other = groups[:, None] != groups[None, :]
    assert np.all(np.abs(together[other] - expected[other]) < 0.02)


def test_noise_has_the_asked_standard_deviation(tmp_path):
    spec = synth.SynthSpec(models=("a",), width=32, shared=4, exclusive=0, active=1.0, noise=0.1, tokens=8000)
    truth = synth.generate(spec, tmp_path / "n.zarr", chunk_rows=4000)
    _, x, D, c = coefficients(tmp_path / "n.zarr", truth)
    residual = x - c @ D  # the noise outside the 4 feature directions: 28 of 32 dimensions
    assert residual.std() * np.sqrt(32 / 28) == pytest.approx(0.1, rel=0.02)


def test_same_spec_same_bytes_and_the_truth_round_trips(tmp_path):
    spec = PRESETS["diff-layers"]
    spec = synth.SynthSpec(**{**spec.to_json(), "tokens": 3000, "models": ("a", "b"), "span": (1, 4),
                              "magnitude": (0.5, 1.5)})
    one = synth.generate(spec, tmp_path / "1.zarr", chunk_rows=700)
    synth.generate(spec, tmp_path / "2.zarr", chunk_rows=1000)  # chunking does not change the data
    a, b = open_store(tmp_path / "1.zarr"), open_store(tmp_path / "2.zarr")
    for n in a.names:
        np.testing.assert_array_equal(a.read(n, 0, 3000), b.read(n, 0, 3000))
    for key in ("tokens", "sequence", "position"):
        np.testing.assert_array_equal(a.token_arrays()[key], b.token_arrays()[key])
    loaded = synth.PlantedDictionary.load(synth.truth_path(tmp_path / "1.zarr"))
    assert loaded.kinds == one.kinds and loaded.layers == one.layers and loaded.source_models == one.source_models
    np.testing.assert_array_equal(loaded.spans, one.spans)
    for n in one.names:
        np.testing.assert_array_equal(loaded.decoders[n], one.decoders[n].astype(np.float32))


# -- the command line -------------------------------------------------------------------------------------------

def run(*args, **kwargs):
    return CliRunner().invoke(cli, ["synth", *map(str, args)], **kwargs)


def test_cli_writes_a_store_and_its_truth_and_prints_the_path(tmp_path):
    out = tmp_path / "toy.zarr"
    result = run("layers", "-o", out, "--tokens", "2K", "--seed", "4", "--width", "16")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    store = open_store(out)
    assert store.n_tokens == 2000 and len(store.names) == 6 and store.sources[0].d == 16
    assert store.meta["synthetic"]["seed"] == 4 and store.meta["synthetic"]["drift"] == 15.0
    assert synth.truth_path(out).is_file()
    again = run("layers", "-o", out, "--tokens", "2K")
    assert again.exit_code == 2 and "--overwrite" in again.stderr and open_store(out).n_tokens == 2000
    assert run("layers", "-o", out, "--tokens", "1K", "--overwrite").exit_code == 0
    assert open_store(out).n_tokens == 1000


def test_cli_reads_a_json_spec_and_options_override_it(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"models": ["base", "chat"], "shared": 5, "exclusive": 1, "tokens": 500}))
    result = run(spec, "-o", tmp_path / "j.zarr", "--exclusive", "2", "--magnitude", "1,2")
    assert result.exit_code == 0, result.stderr
    truth = synth.PlantedDictionary.load(synth.truth_path(tmp_path / "j.zarr"))
    assert truth.kinds.count("exclusive:chat") == 2 and truth.model_names == ["base", "chat"]
    assert open_store(tmp_path / "j.zarr").meta["synthetic"]["magnitude"] == [1.0, 2.0]


@pytest.mark.parametrize("args, message", [
    (["nonsense"], "neither a preset"),
    (["{spec}"], "unknown field"),
    (["--span", "3"], "MIN-MAX"),
    (["--active", "0"], "--active"),
    (["--frequencies", "zipf"], "--frequencies"),
    (["--noise", "nan"], "'--noise': 'nan' is not a finite number"),
])
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, message):
    spec = tmp_path / "bad.json"
    spec.write_text(json.dumps({"widht": 3}))
    result = run(*[a.format(spec=spec) for a in args], "-o", tmp_path / "x.zarr")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == [spec]


# -- recovery, end to end -------------------------------------------------------------------------------------

def test_eval_reports_recovery_by_layer_span(tmp_path):
    """A cross-layer store whose features span 1-3 of 3 layers with drifting directions: a TopK
    crosscoder trained briefly finds most of them, and xc eval reports recovery per span."""
    store = tmp_path / "deep.zarr"
    spec = synth.SynthSpec(models=("m",), layers=3, width=10, shared=12, exclusive=0, span=(1, 3), drift=20,
                           active=1.5, tokens=8192, seed=3)
    truth = synth.generate(spec, store, chunk_rows=512)
    path = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / "x.safetensors"), arch="topk",
                                   latents=24, k=2, batch_size=256, tokens=6 * 8192, lr=5e-3, eval_fraction=0.125,
                                   dead_tokens=2000, shuffle_buffer=2048, checkpoint_every=10_000, device="cpu"))
    report = evaluate(EvalConfig(str(path), (str(store),), truth=str(synth.truth_path(store)), device="cpu"))
    lengths = truth.span_lengths()
    by_span = report["truth"]["by_span"]
    assert {int(k): v["features"] for k, v in by_span.items()} == {n: int((lengths == n).sum()) for n in set(lengths)}
    total = sum(v["recovered"] * v["features"] for v in by_span.values()) / truth.n_features
    assert total == pytest.approx(report["truth"]["recovered"])
    assert report["truth"]["recovered"] >= 0.9 and report["truth"]["mmcs"] > 0.95
    assert report["fvu_total"] < 0.2


def test_trigger_ties_each_exclusive_feature_to_a_shared_one(tmp_path):
    """--trigger 0.5: an exclusive feature fires only when its shared trigger fires, on half of its firings."""
    from xcli.data.synth import PlantedDictionary, generate, load_spec, sample, truth_path

    spec = load_spec(None, models=("a", "b"), width=8, shared=6, exclusive=2, active=2.0, tokens=1024, trigger=0.5)
    truth = generate(spec, tmp_path / "s.zarr")
    assert PlantedDictionary.load(truth_path(tmp_path / "s.zarr")).triggers.tolist() == truth.triggers.tolist()
    assert truth.triggers.tolist() == [-1] * 6 + [0, 1, 2, 3]  # a's two exclusives, then b's
    coefficients, _ = sample(truth, 200_000, (0.5, 1.5), 0.0, np.random.default_rng(0))
    fires = coefficients > 0
    for g in range(6, 10):
        h = truth.triggers[g]
        assert not (fires[:, g] & ~fires[:, h]).any()  # never without its trigger
        assert fires[fires[:, h], g].mean() == pytest.approx(0.5, abs=0.01)
        assert fires[:, g].mean() == pytest.approx(truth.frequency[g], rel=0.05)
    with pytest.raises(BadInput, match="--trigger 1.5 must be between 0 and 1"):
        load_spec(None, trigger=1.5)
    with pytest.raises(BadInput, match="needs --shared and --exclusive"):
        load_spec(None, shared=0, trigger=0.5)


def test_hierarchy_parents_fire_with_any_child_and_children_exclude_each_other(tmp_path):
    """--hierarchy 2,3: features 0 and 4 are parents of 1-3 and 5-7; the truth records it, and the rows
    follow it: a parent fires whenever a child does (and alone too), two children of one parent never
    fire together, and every feature fires with the frequency the truth gives."""
    from xcli.data.synth import PlantedDictionary, generate, load_spec, sample, truth_path

    spec = load_spec(None, models=("m",), width=16, shared=12, exclusive=0, active=2.0, tokens=512,
                     frequencies="zipf:0.5", hierarchy=(2, 3))
    truth = generate(spec, tmp_path / "h.zarr")
    assert truth.parents.tolist() == [-1, 0, 0, 0, -1, 4, 4, 4, -1, -1, -1, -1]
    assert PlantedDictionary.load(truth_path(tmp_path / "h.zarr")).parents.tolist() == truth.parents.tolist()
    coefficients, _ = sample(truth, 200_000, (0.5, 1.5), 0.0, np.random.default_rng(0))
    fires = coefficients > 0
    for parent, kids in ((0, [1, 2, 3]), (4, [5, 6, 7])):
        any_child = fires[:, kids].any(axis=1)
        assert not (any_child & ~fires[:, parent]).any()  # never a child without its parent
        assert fires[:, kids].sum(axis=1).max() == 1  # mutually exclusive
        assert (fires[:, parent] & ~any_child).any()  # the parent also fires alone
    assert fires.mean(axis=0) == pytest.approx(truth.frequency, rel=0.05)
    assert truth.frequency[0] > truth.frequency[1:4].sum()
    plain = load_spec(None, models=("m",), width=16, shared=12, exclusive=0, active=2.0, tokens=512)
    assert generate(plain, tmp_path / "p.zarr").parents is None


@pytest.mark.parametrize("fields, message", [
    (dict(hierarchy=(0, 3)), "--hierarchy 0,3 must be PARENTS,CHILDREN of at least 1 each"),
    (dict(hierarchy=(4, 3), shared=12), r"PARENTS x \(1 \+ CHILDREN\) at most --shared \(12\)"),
])
def test_bad_hierarchy_is_refused(fields, message):
    from xcli.data.synth import load_spec

    with pytest.raises(BadInput, match=message):
        load_spec(None, **fields)


def test_hierarchy_whose_children_would_fire_on_every_token_is_refused(tmp_path):
    from xcli.data.synth import generate, load_spec

    spec = load_spec(None, models=("m",), width=8, shared=4, exclusive=0, active=3.5, hierarchy=(1, 3))
    with pytest.raises(BadInput, match="the children of a parent would fire on 2.62 of the tokens, above 1"):
        generate(spec, tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()


def test_a_truth_file_with_bad_parents_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from xcli.data.synth import PlantedDictionary, generate, load_spec, truth_path

    spec = load_spec(None, models=("m",), width=8, shared=6, exclusive=0, active=1.0, tokens=256, hierarchy=(1, 2))
    generate(spec, tmp_path / "h.zarr")
    path = truth_path(tmp_path / "h.zarr")
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    # a grandparent, one entry short, a feature that does not exist
    for parents in ([-1, 0, 1, -1, -1, -1], [-1, 0, 0, -1, -1], [-1, 0, 9, -1, -1, -1]):
        save_file({**tensors, "parents": np.array(parents, dtype=np.int64)}, str(path), metadata=meta)
        with pytest.raises(BadInput, match="tensor parents is not one parent"):
            PlantedDictionary.load(path)
