"""xc eval: reconstruction metrics, CE/KL scores against reference values and brute force,
planted-feature recovery, held-out rows, the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import tiny_models
import xcli
from xcli.analysis.config import EvalConfig
from xcli.analysis.evaluate import evaluate, truth_metrics
from xcli.analysis.reconstruction import histogram_quantile
from xcli.analysis.splice import ce_score, kl_score, store_windows
from xcli.cli import cli
from xcli.crosscoder import model as cc
from xcli.data import synth
from xcli.data.loader import StoreSet
from xcli.data.store import StoreWriter
from xcli.errors import BadInput
from xcli.source import Source
from xcli.train import loop as tr

ROOT = Path(__file__).resolve().parents[2]
LAYER = 1  # tiny models have 3 layers; hidden_states[LAYER + 1] is block LAYER's output (not the final norm)


# -- the scores ------------------------------------------------------------------------------------

def test_scores_reproduce_the_reference_values():
    """A GPT-2 small SAE's published CE and KL figures (Neuronpedia, OpenAI's GPT-2-small 128k SAE)."""
    assert ce_score(13.054040908813477, 3.668210983276367, 3.599064588546753) == pytest.approx(
        0.9926867722998524, abs=1e-15)
    assert kl_score(9.511523246765137, 0.07359001040458679) == pytest.approx(0.9922630678078178, abs=1e-15)
    assert ce_score(3.0, 3.0, 3.0) is None and kl_score(0.0, 0.0) is None  # undefined, not 0 or NaN
    assert ce_score(5.0, 2.0, 2.0) == 1 and ce_score(5.0, 5.0, 2.0) == 0


def test_histogram_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = rng.integers(0, 12, rng.integers(1, 400))
        histogram = np.bincount(values, minlength=13)
        for q in (0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            assert histogram_quantile(histogram, q) == np.quantile(values, q, method="inverted_cdf")


# -- reconstruction metrics --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A small two-model synthetic store and a TopK crosscoder trained on it (a few seconds)."""
    root = tmp_path_factory.mktemp("planted")
    spec = synth.SynthSpec(models=("a", "b"), width=12, shared=8, exclusive=3, scaled=2, active=2.0,
                           tokens=8192, seed=1)
    truth = synth.generate(spec, root / "toy.zarr", chunk_rows=512)
    path = tr.train(tr.TrainConfig(stores=(str(root / "toy.zarr"),), output=str(root / "x.safetensors"), arch="topk",
                                   latents=40, k=2, batch_size=256, tokens=4 * 8192, lr=4e-3, eval_fraction=0.125,
                                   dead_tokens=2000, shuffle_buffer=2048, checkpoint_every=10_000, device="cpu"))
    return {"store": root / "toy.zarr", "truth": truth, "checkpoint": path}


def test_held_out_metrics_are_the_ones_training_recorded(planted):
    report = evaluate(EvalConfig(str(planted["checkpoint"]), (str(planted["store"]),), device="cpu"))
    training = xcli.load(planted["checkpoint"]).metadata["training"]
    assert report["rows"] == "held-out" and report["tokens"] == training["eval_tokens"] == 1024
    assert report["fvu_total"] == pytest.approx(training["fvu_total"], rel=1e-12)
    assert report["fvu"] == pytest.approx(training["fvu"], rel=1e-12)
    assert report["l0"] == pytest.approx(training["l0"]) and report["dead_fraction"] == training["dead_fraction"]


def test_all_rows_metrics_match_a_numpy_computation(planted):
    model = xcli.load(planted["checkpoint"])
    stores = StoreSet([planted["store"]])
    report = evaluate(EvalConfig(str(planted["checkpoint"]), (str(planted["store"]),), all_rows=True,
                                 batch_size=1000, device="cpu"))
    store = stores.stores[0]
    x = {n: store.read(n, 0, store.n_tokens) for n in store.names}
    with torch.no_grad():
        f = model.encode({n: torch.from_numpy(v) for n, v in x.items()}).numpy()
        recon = {n: v.numpy() for n, v in model.decode(torch.from_numpy(f)).items()}
    scale = {n: float(model.scale(n)) for n in store.names}
    err = {n: ((x[n] - recon[n]).astype(np.float64) ** 2).sum() for n in store.names}
    var = {n: ((x[n] - x[n].mean(0)).astype(np.float64) ** 2).sum() for n in store.names}
    for n in store.names:
        assert report["fvu"][n] == pytest.approx(err[n] / var[n], rel=1e-4)
    total = sum(err[n] * scale[n] ** 2 for n in x) / sum(var[n] * scale[n] ** 2 for n in x)  # normalised units
    assert report["fvu_total"] == pytest.approx(total, rel=1e-4)
    l0 = (f != 0).sum(1)
    assert report["tokens"] == 8192 and report["l0"] == pytest.approx(l0.mean())
    assert report["l0_quantiles"] == {str(q): int(np.quantile(l0, q, method="inverted_cdf"))
                                      for q in (0.01, 0.1, 0.5, 0.9, 0.99)}
    assert report["dead_fraction"] == pytest.approx(1 - (f != 0).any(0).mean())


def test_held_out_rows_need_the_training_store(planted, tmp_path):
    other = tmp_path / "other.zarr"
    synth.generate(synth.SynthSpec(models=("a", "b"), width=12, shared=8, exclusive=3, scaled=2, active=2.0,
                                   tokens=4096, seed=2), other, chunk_rows=512)
    with pytest.raises(BadInput, match="--all-rows"):
        evaluate(EvalConfig(str(planted["checkpoint"]), (str(other),), device="cpu"))
    assert evaluate(EvalConfig(str(planted["checkpoint"]), (str(other),), all_rows=True,
                               device="cpu"))["tokens"] == 4096


# -- planted truth ---------------------------------------------------------------------------------------

def test_truth_metrics_match_a_brute_force_computation(planted):
    model, truth = xcli.load(planted["checkpoint"]), planted["truth"]
    fired = np.random.default_rng(0).random(model.n_latents) < 0.7
    got = truth_metrics(model, truth, 0.9, fired)
    planted_rows = [np.concatenate([truth.decoders[n][g] for n in truth.names]) for g in range(truth.n_features)]
    learned_rows = [np.concatenate([(model.decoder_weight(n)[i] / model.scale(n)).detach().numpy()
                                    for n in truth.names]) for i in range(model.n_latents)]
    cos = np.array([[float(np.dot(u, v) / np.linalg.norm(u) / np.linalg.norm(v)) for v in learned_rows]
                    for u in planted_rows])
    best = cos.max(1)
    assert got["mmcs"] == pytest.approx(best.mean(), abs=1e-5)
    assert got["recovered"] == pytest.approx((best > 0.9).mean())
    assert got["reverse_mmcs"] == pytest.approx(cos.max(0)[fired].mean(), abs=1e-5)
    kinds = np.array(truth.kinds)
    for kind, row in got["by_kind"].items():
        assert row["features"] == (kinds == kind).sum()
        assert row["recovered"] == pytest.approx((best[kinds == kind] > 0.9).mean())
    assert got["by_span"] == {"1": {"features": truth.n_features, "mmcs": got["mmcs"], "recovered": got["recovered"]}}


def test_a_crosscoder_holding_the_planted_directions_recovers_everything(tmp_path):
    spec = synth.SynthSpec(models=("m",), layers=4, width=10, shared=6, exclusive=0, span=(1, 4), drift=20,
                           tokens=256)
    truth = synth.generate(spec, tmp_path / "deep.zarr", chunk_rows=64)
    sources = [Source(n, "m", "synthetic", layer, 10) for n, layer in zip(truth.names, truth.layers)]
    model = cc.Crosscoder(sources, 8, "relu")
    with torch.no_grad():
        for n in truth.names:
            model.decoder_weight(n)[:6] = torch.from_numpy(truth.decoders[n]) * 3.0  # any positive multiple
    got = truth_metrics(model, truth)
    assert got["mmcs"] == pytest.approx(1.0, abs=1e-6) and got["recovered"] == 1.0
    lengths = truth.span_lengths()
    assert {int(k): v["features"] for k, v in got["by_span"].items()} == \
        {int(n): int((lengths == n).sum()) for n in set(lengths.tolist())}


def test_classification_accuracy_against_the_planted_labels(tmp_path):
    """Latents holding the planted directions are classified as planted; giving the exclusive ones an
    equal-norm decoder in the other model makes exactly those wrong (they look shared)."""
    spec = synth.SynthSpec(models=("a", "b"), width=12, shared=5, exclusive=2, scaled=2, scale=0.25, active=2,
                           tokens=256)
    truth = synth.generate(spec, tmp_path / "d.zarr", chunk_rows=64)
    sources = [Source(n, m, "synthetic", 0, 12) for n, m in zip(truth.names, truth.source_models)]
    model = cc.Crosscoder(sources, 16, "relu")
    G = truth.n_features
    with torch.no_grad():
        model.input_scale.copy_(torch.tensor([0.5, 2.0]))  # classes are judged in normalised units
        for n in truth.names:
            model.decoder_weight(n)[:G] = torch.from_numpy(truth.decoders[n]) * model.scale(n)
    from xcli.analysis.evaluate import planted_classes

    # r = ||d_b|| / (||d_a|| + ||d_b||) in normalised units: shared 0.8 (a scale of 0.5 vs 2), scaled:a
    # 0.94, scaled:b 0.5, exclusive 0 or 1
    expected = {"shared": "mixed", "exclusive:a": "exclusive:a", "exclusive:b": "exclusive:b",
                "scaled:a": "exclusive:b", "scaled:b": "shared"}
    assert planted_classes(model, truth) == [expected[k] for k in truth.kinds]
    got = truth_metrics(model, truth)["classification"]
    assert got["accuracy"] == 1.0 and set(got["by_kind"].values()) == {1.0}
    with torch.no_grad():
        model.input_scale.fill_(1.0)
        for n in truth.names:
            model.decoder_weight(n)[:G] = torch.from_numpy(truth.decoders[n])
        exclusive = [g for g, k in enumerate(truth.kinds) if k.startswith("exclusive")]
        for g in exclusive:  # a unit-norm junk row in the other model: looks shared
            owner = truth.kinds[g].split(":")[1]
            other = "b.synthetic.0" if owner == "a" else "a.synthetic.0"
            model.decoder_weight(other)[g] = 0
            model.decoder_weight(other)[g, g] = 1.0
    got = truth_metrics(model, truth, threshold=0.5)["classification"]
    assert got["accuracy"] == pytest.approx(1 - len(exclusive) / G)
    assert got["by_kind"]["exclusive:a"] == got["by_kind"]["exclusive:b"] == 0 and got["by_kind"]["shared"] == 1


# -- spliced-in loss -------------------------------------------------------------------------------------------

def harvest_like(path, models: dict, lines, context=12, chunk_rows=16):
    """A store written the way `xc harvest` writes one: packed windows of BOS + text with EOS between
    documents, special-token rows left out, resid_post of block LAYER per model, and the models and
    packing in attrs["xc"]. Activations come from output_hidden_states (independent of xc's hooks).
    Returns the windows as token-id lists."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(next(iter(models.values())))
    bos, eos = tok.bos_token_id, tok.eos_token_id
    stream = []
    for i, line in enumerate(lines):
        stream += ([eos] if i else []) + tok(line, add_special_tokens=False)["input_ids"]
    windows = [[bos] + stream[i:i + context - 1] for i in range(0, len(stream), context - 1)]
    acts = {}
    for alias, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            acts[alias] = [model(torch.tensor([w]), output_hidden_states=True).hidden_states[LAYER + 1][0]
                           for w in windows]
    sources = [Source(f"{a}.resid_post.{LAYER}", a, "resid_post", LAYER, 32) for a in models]
    meta = {"packing": {"prefix": [bos], "suffix": [], "separator": [eos], "context_length": context},
            "harvest": {"models": [{"alias": a, "id": str(f), "revision": None} for a, f in models.items()]}}
    writer = StoreWriter(path, sources, meta, dtype="float32", chunk_rows=chunk_rows)
    for index, w in enumerate(windows):
        keep = np.array([t not in (bos, eos) for t in w])
        writer.append({s.name: acts[s.model][index].numpy()[keep] for s in sources}, tokens=np.array(w)[keep],
                      sequence=np.full(keep.sum(), index), position=np.nonzero(keep)[0])
    writer.close()
    return windows


@pytest.fixture(scope="module")
def lm_store(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "acts.zarr"
    lines = [" ".join(line.split()[:9]) for line in tiny_models.corpus_lines(12, seed=4)]
    windows = harvest_like(path, {"base": tiny["gpt2"], "chat": tiny["gpt2_b"]}, lines)
    return {"path": path, "windows": windows}


def identity_crosscoder(sources, scale: float = 1.0):
    """A relu crosscoder that reconstructs every source exactly: f = relu([x, -x]), x̂ = f+ - f-."""
    dims = [s.d for s in sources]
    model = cc.Crosscoder(sources, 2 * sum(dims), "relu")
    offset = 0
    with torch.no_grad():
        model.input_scale.fill_(scale)
        for s in sources:
            eye = torch.eye(s.d)
            block = torch.zeros(s.d, model.n_latents)
            block[:, offset:offset + s.d], block[:, offset + s.d:offset + 2 * s.d] = eye, -eye
            model.encoder_weight(s.name).copy_(block)
            model.decoder_weight(s.name).copy_(block.T)
            offset += 2 * s.d
    return model


def save_model(model, path):
    cc.save(model, path)
    return str(path)


def store_sources(path):
    return StoreSet([path]).sources


def test_store_windows_rebuild_the_harvested_windows(lm_store):
    stores = StoreSet([lm_store["path"]])
    windows = store_windows(stores, np.arange(stores.n_chunks), limit=1000)
    assert [w.ids.tolist() for w in windows] == lm_store["windows"][:len(windows)]
    assert len(windows) == len(lm_store["windows"])
    for w in windows:  # BOS and separators stay clean; the last position has nothing to predict
        assert not w.splice[0] and w.splice.sum() == (~np.isin(w.ids, [2, 3])).sum()
        assert not w.score[-1] and (w.score <= w.splice).all()


def test_perfect_reconstruction_scores_one_and_zero_reconstruction_is_the_ablation(lm_store, tmp_path):
    sources = store_sources(lm_store["path"])
    perfect = save_model(identity_crosscoder(sources, scale=0.37), tmp_path / "perfect.safetensors")
    zero = save_model(cc.Crosscoder(sources, 8, "relu"), tmp_path / "zero.safetensors")
    run = dict(stores=(str(lm_store["path"]),), all_rows=True, splice=True, windows=1000, device="cpu",
               dtype="float32")
    good = evaluate(EvalConfig(perfect, **run))
    assert good["fvu_total"] == pytest.approx(0, abs=1e-12) and set(good["splice"]) == {"base", "chat"}
    for row in good["splice"].values():
        assert row["ce_spliced"] == pytest.approx(row["ce_clean"], abs=1e-5)
        assert row["kl_spliced"] == pytest.approx(0, abs=1e-6)
        assert row["ce_score"] == pytest.approx(1, abs=1e-4) and row["kl_score"] == pytest.approx(1, abs=1e-6)
        # ablation changes the (random) model, so both scores are defined
        assert abs(row["ce_ablated"] - row["ce_clean"]) > 1e-3 and row["kl_ablated"] > 1e-3
    bad = evaluate(EvalConfig(zero, **run))
    for model, row in bad["splice"].items():
        assert row["ce_spliced"] == row["ce_ablated"] and row["kl_spliced"] == row["kl_ablated"]
        assert row["ce_score"] == 0 and row["kl_score"] == 0
        assert row["ce_clean"] == good["splice"][model]["ce_clean"]
        assert row["tokens"] == good["splice"][model]["tokens"] > 0


def test_spliced_loss_matches_a_brute_force_computation(lm_store, tiny, tmp_path):
    """A random crosscoder reading both models; each model spliced separately by hand, one window at a time."""
    from transformers import AutoModelForCausalLM

    sources = store_sources(lm_store["path"])
    model = cc.Crosscoder(sources, 24, "topk", k=5)
    model.init_weights(torch.Generator().manual_seed(0), decoder_norm=2.0)
    with torch.no_grad():
        model.b_enc.fill_(0.1)
    path = save_model(model, tmp_path / "random.safetensors")
    report = evaluate(EvalConfig(path, (str(lm_store["path"]),), all_rows=True, splice=True, windows=1000,
                                 window_batch=3, device="cpu", dtype="float32"))
    lms = {a: AutoModelForCausalLM.from_pretrained(tiny[k]).eval() for a, k in (("base", "gpt2"), ("chat", "gpt2_b"))}
    sums = {a: np.zeros(6) for a in lms}
    for w in lm_store["windows"]:
        ids = torch.tensor([w])
        keep = torch.tensor([t not in (2, 3) for t in w])
        scored = keep.clone()
        scored[-1] = False
        with torch.no_grad():
            clean = {a: m(ids, output_hidden_states=True) for a, m in lms.items()}
            x = {f"{a}.resid_post.{LAYER}": clean[a].hidden_states[LAYER + 1][0][keep] for a in lms}
            recon = model.decode(model.encode(x))
            for k, (a, m) in enumerate(lms.items()):
                logp_clean = torch.log_softmax(clean[a].logits[0], -1)
                for j, values in enumerate((recon[f"{a}.resid_post.{LAYER}"], 0.0)):
                    def hook(module, args, output, values=values):
                        output = output.clone()
                        output[0, keep] = values
                        return output
                    handle = m.transformer.h[LAYER].register_forward_hook(hook)
                    logp = torch.log_softmax(m(ids).logits[0], -1)
                    handle.remove()
                    targets = ids[0, 1:][scored[:-1]]
                    sums[a][1 + j] += F.nll_loss(logp[:-1][scored[:-1]], targets, reduction="sum").item()
                    sums[a][3 + j] += F.kl_div(logp[:-1][scored[:-1]], logp_clean[:-1][scored[:-1]],
                                               log_target=True, reduction="sum").item()
                sums[a][0] += F.nll_loss(logp_clean[:-1][scored[:-1]], ids[0, 1:][scored[:-1]], reduction="sum").item()
                sums[a][5] += int(scored.sum())
    for a, s in sums.items():
        row = report["splice"][a]
        n = s[5]
        assert row["tokens"] == n
        for key, value in zip(("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated"), s[:5] / n):
            assert row[key] == pytest.approx(value, rel=1e-4), key
        assert row["ce_score"] == pytest.approx((s[2] - s[1]) / (s[2] - s[0]), rel=1e-3)
        assert row["kl_score"] == pytest.approx((s[4] - s[3]) / s[4], rel=1e-3)
        assert row["kl_spliced"] > 1e-4 and row["ce_spliced"] != row["ce_clean"]  # a real change was measured


def test_splice_needs_every_model_the_crosscoder_reads(lm_store, tiny, tmp_path):
    path = save_model(identity_crosscoder(store_sources(lm_store["path"])), tmp_path / "x.safetensors")
    with pytest.raises(BadInput, match="chat"):
        evaluate(EvalConfig(path, (str(lm_store["path"]),), all_rows=True, models=(f"base={tiny['gpt2']}",),
                            device="cpu"))
    one = [s for s in store_sources(lm_store["path"]) if s.model == "base"]
    path = save_model(identity_crosscoder(one), tmp_path / "base.safetensors")
    report = evaluate(EvalConfig(path, (str(lm_store["path"]),), all_rows=True, models=(f"base={tiny['gpt2']}",),
                                 windows=3, device="cpu", dtype="float32"))
    assert set(report["splice"]) == {"base"} and report["splice"]["base"]["windows"] == 3


def test_splice_on_a_text_file(lm_store, tiny, tmp_path):
    text = tmp_path / "eval.txt"
    text.write_text("the cat sees a dog\n\nred fish swims under the old tree .\n")
    one = [s for s in store_sources(lm_store["path"]) if s.model == "base"]
    path = save_model(identity_crosscoder(one), tmp_path / "base.safetensors")
    report = evaluate(EvalConfig(path, (str(lm_store["path"]),), all_rows=True, models=(f"base={tiny['gpt2']}",),
                                 data=str(text), device="cpu", dtype="float32"))
    row = report["splice"]["base"]
    assert row["windows"] == 2 and row["tokens"] == 4 + 7  # words but the last of each line
    assert row["ce_score"] == pytest.approx(1, abs=1e-4)


def test_splice_into_a_real_harvest_at_every_named_site(tiny, corpus_file, tmp_path):
    """`xc harvest` output (two model families, four sites): the windows rebuilt from the store are
    harvest's own, the models come from the store's provenance, an exact reconstruction scores 1,
    and a zero reconstruction of any one source changes that model exactly as ablating it does."""
    from transformers import AutoTokenizer

    from xcli.data.corpus import Packing, read_documents, windows
    from xcli.data.harvest import HarvestConfig, harvest
    from xcli.lm.config import ModelSpec

    store = harvest(HarvestConfig(models=(ModelSpec("g", str(tiny["gpt2"])), ModelSpec("l", str(tiny["llama"]))),
                                  data=str(corpus_file), output=tmp_path / "h.zarr", layers="1",
                                  sites=("resid_pre", "resid_post", "attn_out", "mlp_out"), context_length=16,
                                  tokens=600, chunk_rows=64, store_dtype="float32"))
    stores = StoreSet([store])
    tokenizer = AutoTokenizer.from_pretrained(tiny["gpt2"])
    expected = list(windows(read_documents(str(corpus_file)), tokenizer, Packing.for_tokenizer(tokenizer, 16)))
    rebuilt = store_windows(stores, np.arange(stores.n_chunks), limit=10_000)
    assert [w.ids.tolist() for w in rebuilt[:-1]] == expected[:len(rebuilt) - 1]
    last = rebuilt[-1].ids.tolist()  # cut by --tokens: a prefix of its window
    assert last == expected[len(rebuilt) - 1][:len(last)]

    sources = stores.sources
    run = dict(stores=(str(store),), all_rows=True, splice=True, windows=20, device="cpu", dtype="float32")
    report = evaluate(EvalConfig(save_model(identity_crosscoder(sources), tmp_path / "id.safetensors"), **run))
    assert set(report["splice"]) == {"g", "l"}
    for row in report["splice"].values():
        assert row["ce_score"] == pytest.approx(1, abs=1e-4) and row["kl_spliced"] == pytest.approx(0, abs=1e-6)
    for source in sources:
        path = save_model(cc.Crosscoder([source], 4, "relu"), tmp_path / f"{source.name}.safetensors")
        row = evaluate(EvalConfig(path, **run))["splice"][source.model]
        assert row["sources"] == [source.name]
        assert row["ce_spliced"] == row["ce_ablated"] and row["kl_spliced"] == row["kl_ablated"] > 0, source


# -- the command line -------------------------------------------------------------------------------------------

def test_cli_prints_one_json_object_and_reads_the_checkpoint_from_stdin(planted):
    result = CliRunner().invoke(cli, ["eval", "-", str(planted["store"]), "--truth",
                                      str(synth.truth_path(planted["store"])), "--device", "cpu"],
                                input=f"{planted['checkpoint']}\n", catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["rows"] == "held-out" and report["truth"]["features"] == planted["truth"].n_features
    assert {"fvu", "fvu_total", "l0", "l0_quantiles", "dead_fraction"} <= set(report)


@pytest.mark.parametrize("args, message", [
    (["missing.safetensors", "{store}"], "does not exist"),
    (["{checkpoint}", "{store}", "--truth", "nope.safetensors"], "truth file"),
    (["{checkpoint}", "{store}", "--splice"], "records no models"),
    (["{checkpoint}", "{store}", "--data", "x.txt"], "--splice"),
    (["{checkpoint}", "{store}", "--threshold", "1.5"], "--threshold"),
])
def test_bad_input_is_one_line_and_exit_2(planted, args, message):
    args = [a.format(store=planted["store"], checkpoint=planted["checkpoint"]) for a in args]
    result = CliRunner().invoke(cli, ["eval", *args, "--device", "cpu"])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, result.stderr


def test_exit_codes_of_a_real_process(planted, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "xcli", "eval", str(planted["checkpoint"]), str(tmp_path / "none.zarr")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1


def test_eval_reports_mean_coherence_for_a_cross_layer_crosscoder(tmp_path):
    from xcli.analysis.coherence import functional_coherence
    from xcli.data.loader import eval_batches

    spec = synth.load_spec("layers", tokens=512, seed=3)
    synth.generate(spec, tmp_path / "layers.zarr", chunk_rows=128)
    stores = StoreSet([tmp_path / "layers.zarr"])
    model = cc.Crosscoder(stores.sources, 64, "topk", k=4)
    model.init_weights(torch.Generator().manual_seed(0))
    cc.save(model, tmp_path / "x.safetensors")
    report = evaluate(EvalConfig(checkpoint=tmp_path / "x.safetensors", stores=(tmp_path / "layers.zarr",),
                                 all_rows=True))
    expected = functional_coherence(xcli.load(tmp_path / "x.safetensors"),
                                    eval_batches(stores, model.read, list(range(stores.n_chunks)), 256))
    assert report["coherence"]["layers"] == list(range(6))
    assert report["coherence"]["mean"] == pytest.approx(expected.mean(), rel=1e-9)
    assert 1.0 <= report["coherence"]["mean"] <= 6.0


def test_a_data_file_that_is_missing_or_not_utf8_is_one_line(tmp_path):
    from xcli.analysis.splice import data_lines

    with pytest.raises(BadInput, match="does not exist"):
        data_lines(str(tmp_path / "none.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(BadInput, match="is not UTF-8 text"):
        data_lines(str(bad))
    good = tmp_path / "good.txt"
    good.write_text("one\n\n  \ntwo\n")
    assert data_lines(str(good)) == ["one", "two"]
