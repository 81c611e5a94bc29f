"""Checkpoints are untrusted files: hostile metadata or tensors are one line, exit 2, and write nothing."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

import xcli
from xcli import files
from xcli.cli.main import cli
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.export.common import plan_slices
from xcli.source import Source

A, B = "a.synthetic.0", "b.synthetic.0"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    store, ckpt = root / "s.zarr", root / "x.safetensors"
    run = CliRunner().invoke
    assert run(cli, ["synth", "diff", "--tokens", "2048", "--chunk-rows", "256", "-o", str(store)]).exit_code == 0
    result = run(cli, ["train", str(store), "-o", str(ckpt), "--steps", "5", "--latents", "16", "--k", "2",
                       "--batch-size", "64", "--eval-fraction", "0.125", "-q"])
    assert result.exit_code == 0, result.stderr
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["sources"][0]["name"] == A and meta["arch"] == "batchtopk"
    return {"store": store, "checkpoint": ckpt, "meta": meta, "tensors": tensors}


def rename(meta, tensors, old, new):
    for s in meta["sources"]:
        if s["name"] == old:
            s["name"] = new
    meta["read"] = [new if n == old else n for n in meta["read"]]
    meta["write"] = [new if n == old else n for n in meta["write"]]
    for key in list(tensors):
        prefix, _, name = key.partition(".")
        if name == old:
            tensors[f"{prefix}.{new}"] = tensors.pop(key)


def source(i, **fields):
    def edit(meta, tensors):
        meta["sources"][i].update(fields)
    return edit


def set_meta(**fields):
    def edit(meta, tensors):
        meta.update(fields)
    return edit


def set_tensor(name, value):
    def edit(meta, tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value
    return edit


def with_nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


# name -> (edit of (meta, tensors) or raw metadata text, words the message must hold)
HOSTILE = {
    "traversal source name": (lambda m, t: rename(m, t, A, "../../../x"), "source name '../../../x'"),
    "absolute source name": (lambda m, t: rename(m, t, A, "/tmp/xc-abs-path"), "source name '/tmp/xc-abs-path'"),
    "dot-dot source name": (lambda m, t: rename(m, t, A, ".."), "source name '..'"),
    "traversal layer": (source(0, layer="../../../../.."), "layer '../../../../..'"),
    "negative layer": (source(0, layer=-1), "layer -1"),
    "bool layer": (source(0, layer=True), "layer True"),
    "float layer": (source(1, layer=1.5), "layer 1.5"),
    "site with slash": (source(0, site="../../x"), "site '../../x'"),
    "string width": (source(0, d="32"), "width d '32'"),
    "zero width": (source(0, d=0), "width d 0"),
    "source not an object": (lambda m, t: m["sources"].__setitem__(0, "a"), "a source is str"),
    "sources not a list": (set_meta(sources={"a": 1}), "sources {'a': 1}"),
    "unknown arch": (set_meta(arch="gated"), "arch 'gated'"),
    "zero latents": (set_meta(n_latents=0), "n_latents 0"),
    "string latents": (set_meta(n_latents="16"), "n_latents '16'"),
    "k too large": (set_meta(k=16), "k 16"),
    "k missing": (set_meta(k=None), "k None"),
    "read unknown source": (set_meta(read=[A, "nope"]), "read names 'nope'"),
    "write empty": (set_meta(write=[]), "write []"),
    "newer version": (set_meta(version=99), "version 99"),
    "metadata a list": ("[1, 2]", "not a JSON object"),
    "metadata not JSON": ("{not json", "not JSON"),
    "vector decoder": (set_tensor(f"decoder.{A}", torch.zeros(32)),
                       f"tensor decoder.{A} has shape (32,), expected (16, 32)"),
    "transposed encoder": (set_tensor(f"encoder.{B}", lambda t: t.T.contiguous()),
                           f"tensor encoder.{B} has shape (16, 32), expected (32, 16)"),
    "matrix input scale": (set_tensor(f"input_scale.{A}", torch.ones(1, 1)), "has shape (1, 1), expected ()"),
    "missing decoder": (lambda m, t: t.pop(f"decoder.{B}"), f"tensor decoder.{B} is missing"),
    "missing threshold": (lambda m, t: t.pop("threshold"), "tensor threshold is missing"),
    "extra tensor": (set_tensor("../evil", torch.zeros(2)), "tensor '../evil' is not part"),
    "integer tensor": (set_tensor("encoder_bias", torch.zeros(16, dtype=torch.int32)), "dtype I32"),
    "nan weights": (set_tensor(f"encoder.{A}", with_nan), "non-finite"),
    "inf threshold": (set_tensor("threshold", torch.tensor(float("inf"))), "tensor threshold holds non-finite"),
    "zero input scale": (set_tensor(f"input_scale.{B}", torch.tensor(0.0)), f"input_scale.{B} is 0.0"),
}


def write_hostile(good, path, edit):
    meta, tensors = json.loads(json.dumps(good["meta"])), dict(good["tensors"])
    if isinstance(edit, str):
        text = edit
    else:
        edit(meta, tensors)
        text = json.dumps(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"xc": text})
    return path


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in sorted(os.walk(root)):
        dirnames.sort()
        digest.update(f"D {os.path.relpath(dirpath, root)}\n".encode())
        for name in sorted(filenames):
            path = Path(dirpath, name)
            digest.update(f"F {path.relative_to(root)} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()


COMMANDS = {
    "classify": lambda ckpt, out, store: ["classify", ckpt, "-o", out / "classes.jsonl"],
    "eval": lambda ckpt, out, store: ["eval", ckpt, store],
    "export saelens": lambda ckpt, out, store: ["export", ckpt, "--format", "saelens", "-o", out / "sae"],
    "export neuronpedia": lambda ckpt, out, store: ["export", ckpt, "--store", store, "-o", out / "np"],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_checkpoint_is_one_line_exit_2_and_writes_nothing(good, tmp_path, case):
    edit, words = HOSTILE[case]
    ckpt = write_hostile(good, tmp_path / "bad.safetensors", edit)
    out = tmp_path / "a" / "b" / "c" / "d" / "e"  # deep, so that any escape still lands under tmp_path
    out.mkdir(parents=True)
    before, store_before = tree_hash(tmp_path), tree_hash(good["store"])
    for command, args in COMMANDS.items():
        result = CliRunner().invoke(cli, [str(a) for a in args(ckpt, out, good["store"])])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (command, result.stderr, result.exception)
        assert len(lines) == 1 and "Traceback" not in result.stderr, (command, result.stderr)
        assert f"checkpoint {str(ckpt)!r}" in lines[0] and words in lines[0], (command, lines[0])
        assert "internal error" not in lines[0] and " --" not in lines[0], (command, lines[0])
        assert tree_hash(tmp_path) == before, command
    assert tree_hash(good["store"]) == store_before
    assert not Path("/tmp/xc-abs-path").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_load_refuses_hostile_checkpoints_with_bad_input(good, tmp_path, case):
    edit, words = HOSTILE[case]
    ckpt = write_hostile(good, tmp_path / "bad.safetensors", edit)
    with pytest.raises(BadInput, match="bad.safetensors") as caught:
        xcli.load(ckpt)
    assert words in str(caught.value)


def test_the_good_checkpoint_still_loads_and_a_float16_copy_too(good, tmp_path):
    model = xcli.load(good["checkpoint"])
    assert model.n_latents == 16 and model.read == [A, B]
    half = {k: v.half() for k, v in good["tensors"].items()}
    save_file(half, str(tmp_path / "half.safetensors"), metadata={"xc": json.dumps(good["meta"])})
    assert xcli.load(tmp_path / "half.safetensors").decoder_weight(A).shape == (16, 32)


def test_store_and_checkpoint_share_the_source_rule():
    for bad in ({"name": "..", "model": "m", "site": "s", "layer": 0, "d": 4},
                {"name": "a/b", "model": "m", "site": "s", "layer": 0, "d": 4},
                {"name": "a", "model": "m", "site": "x/y", "layer": 0, "d": 4},
                {"name": "a", "model": "m", "site": "s", "layer": "1", "d": 4},
                {"name": "a", "model": "m", "site": "s", "layer": 0, "d": 4.0}):
        with pytest.raises(BadInput):
            Source.from_json(bad)
    ok = Source.from_json({"name": "m.model.layers.3.mlp", "model": "m", "site": "model.layers.{layer}.mlp",
                           "layer": 3, "d": 4})
    assert ok.layer == 3 and ok.revision is None


def test_inside_refuses_paths_that_leave_the_root(tmp_path):
    assert files.inside(tmp_path, tmp_path / "v1" / "m" / "s") == tmp_path / "v1" / "m" / "s"
    for escape in (tmp_path / ".." / "x", tmp_path / "v1" / ".." / ".." / "x", Path("/etc/passwd")):
        with pytest.raises(BadInput, match="outside the output"):
            files.inside(tmp_path, escape)


def test_export_folders_stay_under_the_output_even_for_a_model_built_in_python(tmp_path):
    # Second guard: a Crosscoder built in Python skips the load checks; its layer still cannot escape.
    sources = [Source("a.resid_post.1", "m", "resid_post", "../../..", 8),
               Source("b.resid_post.1", "m2", "resid_post", 1, 8)]
    model = cc.Crosscoder(sources, 4, "relu")
    with pytest.raises(BadInput, match="not a plain folder name"):
        plan_slices(model, "set", {}, {"m": None, "m2": None})
    good = plan_slices(cc.Crosscoder(sources[1:], 4, "relu"), "set", {}, {"m2": None})[0]
    assert good.dir(tmp_path) == tmp_path / "v1" / "m2" / "1-set"
    good.source_id = "../../../x"
    with pytest.raises(BadInput, match="outside the output"):
        good.dir(tmp_path)


def test_an_unfinished_checkpoint_is_used_with_a_warning(good, tmp_path):
    def unfinished(meta, tensors):
        meta["training"].update(complete=False, step=3, steps=5)
    ckpt = write_hostile(good, tmp_path / "part.safetensors", unfinished)
    for args in (["classify", ckpt], ["eval", ckpt, good["store"]]):
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr
        assert "is from an unfinished training run (step 3 of 5)" in result.stderr and "--resume" in result.stderr
    result = CliRunner().invoke(cli, ["classify", str(good["checkpoint"])])
    assert result.exit_code == 0 and "unfinished" not in result.stderr
