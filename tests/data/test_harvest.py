"""xc harvest: stored rows are the models' own activations, and the run is safe to stop and repeat."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from transformers import AutoModel, AutoTokenizer

import tiny_models
from xcli.cli import cli
from xcli.data import store as st
from xcli.data.corpus import Packing
from xcli.data.harvest import HarvestConfig, harvest
from xcli.errors import BadInput
from xcli.lm.config import ModelSpec, parse_layers

FINAL_NORM = {"gpt2": "ln_f", "gpt_neox": "final_layer_norm", "llama": "norm", "gemma2": "norm", "bert": None}
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """The shared tiny models plus a Gemma-2-style one (sublayer outputs are normed before the add)."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tokenizer = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gemma2") / "gemma2"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {**tiny, "gemma2": path}


def run_harvest(models, tmp_path, name="s.zarr", model=("gpt2",), **kw):
    kw.setdefault("layers", "all")
    kw.setdefault("context_length", 16)
    kw.setdefault("batch_size", 3)
    kw.setdefault("chunk_rows", 64)
    specs = tuple(ModelSpec(alias=m, id=str(models[m])) for m in model)
    return st.open_store(harvest(HarvestConfig(models=specs, output=tmp_path / name, **kw)))


def windows_of(store):
    """The token windows the store was computed from (needs special tokens kept)."""
    ids = store.token_arrays()
    return [ids["tokens"][ids["sequence"] == s] for s in np.unique(ids["sequence"])]


def reference(path, windows):
    """The model's own hidden states, one window at a time (no batching, no hooks)."""
    model = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        per_window = [model(input_ids=torch.tensor(w[None].astype(np.int64)), output_hidden_states=True)
                      for w in windows]
    hidden = [torch.cat([o.hidden_states[i][0] for o in per_window]) for i in range(len(per_window[0].hidden_states))]
    return model, hidden


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama", "gemma2", "bert"])
def test_stored_rows_are_the_models_own_activations(models, corpus_file, tmp_path, family):
    store = run_harvest(models, tmp_path, model=(family,), data=str(corpus_file), sites=SITES,
                        keep_special_tokens=True, store_dtype="float32")
    model, hidden = reference(models[family], windows_of(store))  # whole windows: BERT looks both ways
    n_layers, n = len(hidden) - 1, store.n_tokens
    assert n == hidden[0].shape[0] > 1000 and store.complete
    assert store.names == [f"{family}.{site}.{layer}" for site in SITES for layer in range(n_layers)]
    row = {site: [torch.from_numpy(store.read(f"{family}.{site}.{layer}", 0, n)) for layer in range(n_layers)]
           for site in SITES}
    close = dict(atol=2e-5, rtol=1e-4)
    for layer in range(n_layers):
        torch.testing.assert_close(row["resid_pre"][layer], hidden[layer], **close)
        if layer < n_layers - 1 or FINAL_NORM[family] is None:
            torch.testing.assert_close(row["resid_post"][layer], hidden[layer + 1], **close)
        if family == "bert":  # post-norm: block = LN(mlp + LN(attn + x))
            block = model.encoder.layer[layer]
            after_attn = block.attention.output.LayerNorm(row["attn_out"][layer] + row["resid_pre"][layer])
            torch.testing.assert_close(block.output.LayerNorm(row["mlp_out"][layer] + after_attn),
                                       row["resid_post"][layer], **close)
        else:  # pre-norm: what the two sublayers add is the change of the residual stream
            torch.testing.assert_close(row["attn_out"][layer] + row["mlp_out"][layer],
                                       row["resid_post"][layer] - row["resid_pre"][layer], **close)
    if FINAL_NORM[family]:
        # HF's last hidden state has the final norm applied; resid_post of the last block does not.
        last = row["resid_post"][-1]
        final_norm = getattr(model, FINAL_NORM[family])
        with torch.no_grad():
            torch.testing.assert_close(final_norm(last), hidden[-1], **close)
        assert not torch.allclose(last, hidden[-1], atol=1e-2)


def test_module_paths_and_layer_placeholder(models, corpus_file, tmp_path):
    store = run_harvest(models, tmp_path, data=str(corpus_file), layers="0,2", keep_special_tokens=True,
                        store_dtype="float32", tokens=300,
                        sites=("transformer.h.1", "h.{layer}.ln_1", "resid_post"))
    assert store.names == ["gpt2.transformer.h.1", "gpt2.h.0.ln_1", "gpt2.h.2.ln_1",
                           "gpt2.resid_post.0", "gpt2.resid_post.2"]
    assert store.source("gpt2.h.2.ln_1").layer == 2 and store.source("gpt2.transformer.h.1").layer is None
    model, hidden = reference(models["gpt2"], windows_of(store))
    torch.testing.assert_close(torch.from_numpy(store.read("gpt2.transformer.h.1", 0, 300)), hidden[2])
    with torch.no_grad():
        for layer in (0, 2):
            expected = model.h[layer].ln_1(hidden[layer])
            torch.testing.assert_close(torch.from_numpy(store.read(f"gpt2.h.{layer}.ln_1", 0, 300)), expected)


def test_windows_pack_documents_with_eos_and_split_long_ones(models, tmp_path):
    docs = tiny_models.corpus_lines(30, seed=3, max_words=50)  # some longer than a window
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n\n")
    store = run_harvest(models, tmp_path, data=str(tmp_path / "c.txt"), layers="0", keep_special_tokens=True)
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    windows = windows_of(store)
    assert all(len(w) == 16 for w in windows[:-1]) and 1 < len(windows[-1]) <= 16
    assert all(w[0] == tok.bos_token_id for w in windows)  # the attention sink is always a special token
    stream = [t for w in windows for t in w[1:]]
    expected = []
    for i, doc in enumerate(docs):
        expected += ([tok.eos_token_id] if i else []) + tok(doc, add_special_tokens=False)["input_ids"]
    assert stream == expected
    ids = store.token_arrays()
    assert ids["position"].tolist() == [p for w in windows for p in range(len(w))]


def test_special_tokens_and_padding_are_not_stored(models, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(tiny_models.corpus_lines(20, seed=4)) + "\n")
    kept = run_harvest(models, tmp_path, "kept.zarr", data=str(tmp_path / "c.txt"), layers="1",
                       keep_special_tokens=True, store_dtype="float32")
    dropped = run_harvest(models, tmp_path, "dropped.zarr", data=str(tmp_path / "c.txt"), layers="1",
                          store_dtype="float32")
    special = AutoTokenizer.from_pretrained(models["gpt2"]).all_special_ids
    k, d = kept.token_arrays(), dropped.token_arrays()
    regular = ~np.isin(k["tokens"], special)
    assert 0 < dropped.n_tokens == regular.sum() < kept.n_tokens
    assert not np.isin(d["tokens"], special).any() and 0 not in d["position"]
    for key in ("tokens", "sequence", "position"):
        assert np.array_equal(d[key], k[key][regular])
    assert np.array_equal(dropped.read("gpt2.resid_post.1", 0, dropped.n_tokens),
                          kept.read("gpt2.resid_post.1", 0, kept.n_tokens)[regular])
    assert dropped.meta["special_tokens_stored"] is False and dropped.meta["packing"]["prefix"] == [2]


def test_two_models_see_the_same_tokens(models, corpus_file, tmp_path):
    store = run_harvest(models, tmp_path, model=("gpt2", "gpt2_b"), data=str(corpus_file), layers="1",
                        sites=("resid_post",), keep_special_tokens=True, store_dtype="float32", tokens=400)
    assert store.names == ["gpt2.resid_post.1", "gpt2_b.resid_post.1"]
    assert [s.model for s in store.sources] == ["gpt2", "gpt2_b"]
    windows = windows_of(store)
    for alias in ("gpt2", "gpt2_b"):
        _, hidden = reference(models[alias], windows)
        torch.testing.assert_close(torch.from_numpy(store.read(f"{alias}.resid_post.1", 0, 400)), hidden[2])
    a, b = store.read("gpt2.resid_post.1", 0, 400), store.read("gpt2_b.resid_post.1", 0, 400)
    assert not np.allclose(a, b)  # two different models, not one model twice
    for name in store.names:  # statistics for input normalisation, per source
        rows = store.read(name, 0, 400).astype(np.float64)
        np.testing.assert_allclose(store.stats(name)["mean"], rows.mean(0), rtol=1e-9)


def test_models_with_different_vocabularies_are_refused(models, corpus_file, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(models["gpt2_b"], other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    result = invoke(["harvest", "-m", str(models["gpt2"]), "-m", f"b={other}", "--layers", "1",
                     "-c", "16", "-d", str(corpus_file), "-o", str(tmp_path / "x.zarr")])
    assert_bad_input(result, "different tokenizers")
    assert "zebra" in result.stderr and not (tmp_path / "x.zarr").exists()


def test_bfloat16_model_is_stored_losslessly(models, corpus_file, tmp_path):
    store = run_harvest(models, tmp_path, model=("llama",), data=str(corpus_file), layers="1", dtype="bfloat16",
                        batch_size=1, keep_special_tokens=True)
    assert store.meta["dtype"] == "bfloat16" and store.arrays["llama.resid_post.1"].dtype == np.uint16
    rows = store.read("llama.resid_post.1", 0, store.n_tokens)
    assert np.array_equal(st.bf16_bits_to_float32(st.float32_to_bf16_bits(rows)), rows)  # exact bf16 values
    model = AutoModel.from_pretrained(models["llama"], dtype=torch.bfloat16).eval()
    with torch.no_grad():
        inputs = [torch.tensor(w[None].astype(np.int64)) for w in windows_of(store)]
        expected = torch.cat([model(input_ids=x, attention_mask=torch.ones_like(x),
                                    output_hidden_states=True).hidden_states[2][0] for x in inputs])
    assert np.array_equal(rows, expected.float().numpy())


def test_float16_overflow_is_an_error_not_inf(models, corpus_file, tmp_path):
    loud = tmp_path / "loud"
    model = AutoModel.from_pretrained(models["gpt2"])
    with torch.no_grad():
        model.wte.weight.mul_(1e6)
    model.save_pretrained(loud)
    AutoTokenizer.from_pretrained(models["gpt2"]).save_pretrained(loud)
    args = ["harvest", "-m", str(loud), "--layers", "0", "--site", "resid_pre", "-c", "16", "-d", str(corpus_file)]
    result = invoke(args + ["-o", str(tmp_path / "a.zarr")])
    assert result.exit_code == 1 and "float16 range" in result.stderr and "--store-dtype" in result.stderr
    store = st.open_store(tmp_path / "a.zarr")
    assert not store.complete and store.n_tokens == 0
    result = invoke(args + ["-o", str(tmp_path / "b.zarr"), "--store-dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    rows = st.open_store(tmp_path / "b.zarr").read("loud.resid_pre.0", 0, 100)
    assert np.isfinite(rows).all() and np.abs(rows).max() > 65504


def invoke(args, **kwargs):
    return CliRunner().invoke(cli, args, **kwargs)


def assert_bad_input(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("change,fragment", [
    ({"-m": "no-such-org/no-such-model"}, "not found locally"),
    ({"-m": "./no/such/folder"}, "does not exist"),
    ({"-m": "CORPUS"}, "not a folder"),
    ({"--layers": "7"}, "use 0-2"),
    ({"--layers": "2-x"}, "not a layer list"),
    ({"--site": "resid_mid"}, "not a named site"),
    ({"--site": "h.0.attn.c_attn.weight"}, "not a named site"),
    ({"-d": "EMPTY"}, "holds no text"),
    ({"-d": "JSONL", "--text-field": "body"}, "no field 'body'"),
    ({"-d": "./missing.txt"}, "does not exist"),
    ({"-c": "100"}, "accepts (64 positions)"),
    ({"--device": "cuda:7"}, "not available"),
    ({"--device": "gpu"}, "--device"),
    ({"--tokens": "lots"}, "not a count"),
    ({"--resume": None, "--overwrite": None}, "exclude each other"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(models, corpus_file, tmp_path, change, fragment):
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    (tmp_path / "docs.jsonl").write_text('{"text": "the cat"}\n{"text": "a dog"}\n')
    opts = {"-m": str(models["gpt2"]), "--layers": "1", "-c": "16", "-d": str(corpus_file),
            "-o": str(tmp_path / "out.zarr"), **change}
    opts["-d"] = {"EMPTY": str(tmp_path / "empty.txt"), "JSONL": str(tmp_path / "docs.jsonl")}.get(opts["-d"], opts["-d"])
    opts["-m"] = str(corpus_file) if opts["-m"] == "CORPUS" else opts["-m"]
    args = ["harvest"] + [x for k, v in opts.items() for x in ([k] if v is None else [k, v])]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(args)
    assert_bad_input(result, fragment)
    if change.get("-m", "").startswith("no-such"):
        assert "no network" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where", ["folder", "stdin", "file"])
def test_text_that_is_not_utf8_is_bad_input_and_leaves_nothing(models, tmp_path, where):
    good = "\n".join(tiny_models.corpus_lines(200, seed=9))
    bad = "the cat sat on the mat caf\xe9\n".encode("latin-1")  # latin-1, not UTF-8
    args = ["harvest", "-m", str(models["gpt2"]), "--layers", "0", "-c", "16", "--chunk-rows", "64",
            "-o", str(tmp_path / "out.zarr")]
    kwargs = {}
    if where == "folder":
        (tmp_path / "docs").mkdir()
        (tmp_path / "docs" / "a.txt").write_text(good)
        (tmp_path / "docs" / "b.txt").write_bytes(bad)
        args += ["-d", str(tmp_path / "docs")]
    elif where == "stdin":
        args += ["-d", "-"]
        kwargs["input"] = good.encode() + b"\n" + bad
    else:
        (tmp_path / "c.txt").write_bytes(good.encode() + b"\n" + bad)
        args += ["-d", str(tmp_path / "c.txt")]
    result = invoke(args, **kwargs)
    assert_bad_input(result, "is not UTF-8 text")
    assert not (tmp_path / "out.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.zarr")]


def test_bad_record_deep_in_the_corpus_leaves_nothing(models, tmp_path):
    lines = [json.dumps({"text": d}) for d in tiny_models.corpus_lines(300, seed=8)]
    lines[250] = json.dumps({"title": "no text here"})
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    result = invoke(["harvest", "-m", str(models["gpt2"]), "--layers", "0", "-c", "16", "--chunk-rows", "64",
                     "-d", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "out.zarr")])
    assert_bad_input(result, "line 251")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]


def test_existing_output_is_not_clobbered(models, corpus_file, tmp_path):
    out = tmp_path / "out.zarr"
    out.mkdir()
    (out / "precious").write_text("x")
    args = ["harvest", "-m", str(models["gpt2"]), "--layers", "1", "-c", "16", "-d", str(corpus_file), "-o", str(out)]
    assert_bad_input(invoke(args), "--overwrite")
    assert (out / "precious").exists()
    # --overwrite replaces only an xc store, not a folder of someone else's files
    assert_bad_input(invoke(args + ["--overwrite"]), "is not an xc store")
    assert [p.name for p in out.iterdir()] == ["precious"]
    (out / "precious").unlink()
    out.rmdir()
    assert invoke(args).exit_code == 0
    result = invoke(args + ["--overwrite"])
    assert result.exit_code == 0 and result.stdout == f"{out}\n"
    assert st.open_store(out).complete
    # a different run over a complete store is refused, naming what differs
    assert_bad_input(invoke(args[:3] + ["--layers", "2"] + args[5:]), "layers")


def test_rerun_on_a_complete_store_does_nothing(models, corpus_file, tmp_path):
    out = tmp_path / "out.zarr"
    args = ["harvest", "-m", str(models["gpt2"]), "--layers", "1", "-c", "16", "-d", str(corpus_file), "-o", str(out)]
    assert invoke(args).exit_code == 0
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    for extra in ([], ["--resume"]):
        result = invoke(args + extra)
        assert result.exit_code == 0 and result.stdout == f"{out}\n" and result.stderr == ""
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp


def test_a_corpus_edited_since_the_store_was_written_is_refused(models, tmp_path):
    """The store records the corpus's content hash: an edit between a kill and --resume (or before a cron
    re-run) is refused instead of mixing old and new text; an untouched corpus is still a no-op."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(tiny_models.corpus_lines(80, seed=4)) + "\n")
    out = tmp_path / "out.zarr"
    args = ["harvest", "-m", str(models["gpt2"]), "--layers", "1", "-c", "16", "-d", str(corpus), "-o", str(out)]
    assert invoke(args).exit_code == 0
    assert invoke(args + ["--resume"]).exit_code == 0  # unchanged: nothing to do
    corpus.write_text(corpus.read_text().replace("the", "a", 1))
    stamp = {q: q.stat().st_mtime_ns for q in out.rglob("*")}
    assert_bad_input(invoke(args + ["--resume"]), "changed since")
    assert {q: q.stat().st_mtime_ns for q in out.rglob("*")} == stamp
    assert invoke(args + ["--overwrite"]).exit_code == 0


def test_token_budget(models, corpus_file, tmp_path):
    store = run_harvest(models, tmp_path, "a.zarr", data=str(corpus_file), layers="1", tokens=123)
    assert store.n_tokens == 123 and store.meta["corpus_exhausted"] is False
    result = invoke(["harvest", "-m", str(models["gpt2"]), "--layers", "1", "-c", "16", "-d", str(corpus_file),
                     "--tokens", "1M", "-o", str(tmp_path / "b.zarr")])
    assert result.exit_code == 0 and "fewer than --tokens 1000000" in result.stderr
    store = st.open_store(tmp_path / "b.zarr")
    assert store.complete and store.meta["corpus_exhausted"] is True
    assert store.n_tokens == run_harvest(models, tmp_path, "c.zarr", data=str(corpus_file), layers="1").n_tokens


@pytest.fixture(scope="module")
def uninterrupted(models, tmp_path_factory):
    """Arguments of a longer harvest of two models, and the store an uninterrupted run writes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    corpus = root / "big.txt"
    corpus.write_text("\n".join(tiny_models.corpus_lines(1200, seed=5)) + "\n")
    args = ["harvest", "-m", str(models["gpt2"]), "-m", f"b={models['gpt2_b']}", "--layers", "0,2",
            "--site", "resid_post", "--site", "mlp_out", "-c", "64", "-b", "4", "--chunk-rows", "256",
            "-d", str(corpus)]
    assert invoke(args + ["-o", str(root / "whole.zarr")]).exit_code == 0
    return args, root / "whole.zarr"


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)])
def test_stopped_run_resumes_to_equal_an_uninterrupted_run(uninterrupted, tmp_path, sig, code):
    args, whole = uninterrupted
    killed = tmp_path / "killed.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "xcli", *args, "-o", str(killed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, committed = time.time() + 60, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = zarr.open_group(str(killed), mode="r").attrs["xc"]["n_tokens"]
        except Exception:  # not created yet
            committed = 0
        if committed >= 512:
            break
        time.sleep(0.01)
    proc.send_signal(sig)
    assert proc.wait() == code
    if sig == signal.SIGINT:
        assert b"interrupted" in proc.stderr.read() and proc.stdout.read() == b""
    partial = st.open_store(killed)
    assert not partial.complete and partial.n_tokens >= 512 and partial.n_tokens % 256 == 0
    assert_bad_input(invoke(args + ["-o", str(killed)]), "--resume")

    result = invoke(args + ["-o", str(killed), "--resume"])
    assert result.exit_code == 0, result.stderr
    a, b = st.open_store(killed), st.open_store(whole)
    assert a.complete and a.n_tokens == b.n_tokens > partial.n_tokens
    assert a.names == b.names
    for name in a.names:
        assert np.array_equal(a.read(name, 0, a.n_tokens), b.read(name, 0, b.n_tokens))
    for key, values in a.token_arrays().items():
        assert np.array_equal(values, b.token_arrays()[key])
    assert a.meta["stats"] == b.meta["stats"]


def test_info_summarises_a_store(models, corpus_file, tmp_path):
    run_harvest(models, tmp_path, "s.zarr", model=("gpt2", "llama"), data=str(corpus_file), layers="0,2",
                tokens=100)
    result = invoke(["info", str(tmp_path / "s.zarr"), "--json"])
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["n_tokens"] == 100 and info["complete"] and info["dtype"] == "float16"
    assert [(s["name"], s["d"]) for s in info["sources"]] == [
        ("gpt2.resid_post.0", 32), ("gpt2.resid_post.2", 32), ("llama.resid_post.0", 32), ("llama.resid_post.2", 32)]
    assert info["bytes_on_disk"] > 4 * 100 * 32 * 2 and info["chunk_rows"] == 64 and info["codec"] == "none"
    text = invoke(["info", str(tmp_path / "s.zarr")]).stdout
    assert "100 tokens, complete" in text and "llama.resid_post.2" in text
    assert invoke(["info", "-"], input=f"{tmp_path / 's.zarr'}\n").stdout == text  # chains after xc harvest
    assert_bad_input(invoke(["info", str(tmp_path / "nothing.zarr")]), "does not exist")


def test_data_from_stdin_jsonl_and_folder_agree(models, tmp_path):
    docs = tiny_models.corpus_lines(12, seed=6)
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)))
    (tmp_path / "folder").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "folder" / f"{i:03d}.txt").write_text(doc)
    common = ["harvest", "-m", str(models["gpt2"]), "--layers", "0", "-c", "16"]
    runs = {
        "stdin": invoke(common + ["-d", "-", "-o", str(tmp_path / "stdin.zarr")], input="\n".join(docs)),
        "jsonl": invoke(common + ["-d", str(tmp_path / "c.jsonl"), "--text-field", "body",
                                  "-o", str(tmp_path / "jsonl.zarr")]),
        "folder": invoke(common + ["-d", str(tmp_path / "folder"), "-o", str(tmp_path / "folder.zarr")]),
        "text": invoke(common + ["-d", str(tmp_path / "c.txt"), "-o", str(tmp_path / "text.zarr")]),
    }
    assert all(r.exit_code == 0 for r in runs.values()), {k: r.stderr for k, r in runs.items()}
    tokens = {k: st.open_store(tmp_path / f"{k}.zarr").token_arrays()["tokens"] for k in runs}
    assert all(np.array_equal(t, tokens["text"]) for t in tokens.values())


def test_dataset_names_read_the_local_cache(models, tmp_path, monkeypatch):
    docs = tiny_models.corpus_lines(5, seed=7)
    calls = []

    def load_dataset(name, split):
        calls.append((name, split, os.environ.get("HF_DATASETS_OFFLINE")))
        return [{"text": d} for d in docs]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    store = run_harvest(models, tmp_path, "d.zarr", data="someone/corpus", layers="0", split="validation")
    assert calls and calls[0][:2] == ("someone/corpus", "validation") and calls[0][2] == "1"
    (tmp_path / "c.txt").write_text("\n".join(docs))
    same = run_harvest(models, tmp_path, "t.zarr", data=str(tmp_path / "c.txt"), layers="0")
    assert np.array_equal(store.token_arrays()["tokens"], same.token_arrays()["tokens"])


def test_hub_ids_resolve_through_the_local_cache_only(models, corpus_file, tmp_path, monkeypatch):
    import huggingface_hub

    commit = "0123456789" * 4
    snapshot = tmp_path / "hub" / "models--xc-test--tiny-gpt2" / "snapshots" / commit
    shutil.copytree(models["gpt2"], snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config = HarvestConfig(models=("xc-test/tiny-gpt2@main",), data=str(corpus_file), output=tmp_path / "hub.zarr",
                           layers="1", context_length=16, tokens=50)
    store = st.open_store(harvest(config))
    assert store.names == ["tiny-gpt2.resid_post.1"] and store.sources[0].revision == commit
    local = run_harvest(models, tmp_path, "local.zarr", layers="1", data=str(corpus_file), tokens=50)
    assert np.array_equal(store.read("tiny-gpt2.resid_post.1", 0, 50), local.read("gpt2.resid_post.1", 0, 50))
    with pytest.raises(BadInput, match="not found locally.*no network"):
        harvest(HarvestConfig(models=("xc-test/tiny-gpt2@v2",), data=str(corpus_file),
                              output=tmp_path / "v2.zarr", layers="1", context_length=16))
    assert not (tmp_path / "v2.zarr").exists()


def test_parse_layers_and_model_specs():
    assert parse_layers("6", 12) == [6] and parse_layers("4-8", 12) == [4, 5, 6, 7, 8]
    assert parse_layers("0,3,6", 12) == [0, 3, 6] and parse_layers("all", 3) == [0, 1, 2]
    assert parse_layers("5,1-2", 12) == [1, 2, 5]
    with pytest.raises(BadInput, match="0-11"):
        parse_layers("12", 12)
    with pytest.raises(BadInput, match="backwards"):
        parse_layers("8-4", 12)
    assert ModelSpec.parse("base=EleutherAI/pythia-70m@step1000") == ModelSpec("base", "EleutherAI/pythia-70m",
                                                                               "step1000")
    assert ModelSpec.parse("gpt2") == ModelSpec("gpt2", "gpt2", None)
    assert ModelSpec.parse("/models/llama-3.1-8b/") == ModelSpec("llama-3-1-8b", "/models/llama-3.1-8b/", None)


def test_packing_follows_the_tokenizer(models):
    tok = AutoTokenizer.from_pretrained(models["gpt2"])
    packing = Packing.for_tokenizer(tok, 16)
    assert packing.prefix == (tok.bos_token_id,) and packing.suffix == () and packing.content_length == 15
    with pytest.raises(BadInput, match="no room"):
        Packing.for_tokenizer(tok, 1)
