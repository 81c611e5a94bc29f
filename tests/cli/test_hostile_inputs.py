"""Hostile inputs, for every subcommand: the exit code, one line on stderr, and nothing changed.

Each case builds its inputs under tmp_path, hashes the whole tree, runs one command and checks the
exit code, that stderr is one line naming the problem (no traceback, no "internal error"), and that
the tree is unchanged: no output, no temp, no edited input.

Damaged checkpoints, damaged stores and --overwrite targets have their own tables beside the code
that checks them (tests/crosscoder/test_checkpoint_validation.py, tests/data/test_store.py,
tests/cli/test_overwrite.py). Here: two writers of one output, text that is not UTF-8, non-finite
numbers for every float option, a full disk, and damage that hypothesis generates.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from xcli import files
from xcli.cli import cli
from xcli.cli.params import FiniteFloat


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A synthetic store (8 chunks) and a checkpoint trained on it, made once."""
    root = tmp_path_factory.mktemp("hostile")
    store, checkpoint = root / "s.zarr", root / "ck.safetensors"
    assert xc(["synth", "diff", "--tokens", "2048", "--chunk-rows", "256", "-o", store]).exit_code == 0
    result = xc(["train", store, "-o", checkpoint, "--steps", "5", "--latents", "16", "--k", "4", "-q"])
    assert result.exit_code == 0, result.stderr
    return {"store": store, "checkpoint": checkpoint}


def xc(args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def tree(root: Path) -> dict[str, str]:
    """Every path under root: a hash of each file's bytes, a mark for each folder."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def assert_one_line(result, code: int, *fragments: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in lines[0], lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# -- what each command writes: (argv builder, the output it writes) ---------------------------------------

def harvest_args(tiny, corpus, out):
    return ["harvest", "-m", tiny["gpt2"], "--layers", "0", "-c", "16", "-d", corpus, "-o", out, "--tokens", "600"]


WRITERS = {
    "synth": lambda t, m, tiny, corpus: ["synth", "diff", "--tokens", "1024", "--chunk-rows", "256", "-o",
                                         t / "out.zarr"],
    "harvest": lambda t, m, tiny, corpus: harvest_args(tiny, corpus, t / "out.zarr"),
    "train": lambda t, m, tiny, corpus: ["train", copy(m["store"], t / "s.zarr"), "-o", t / "out.safetensors",
                                         "--steps", "3", "--latents", "16", "--k", "4"],
    "export saelens": lambda t, m, tiny, corpus: ["export", copy(m["checkpoint"], t / "ck.safetensors"),
                                                  "--format", "saelens", "-o", t / "out"],
    "export neuronpedia": lambda t, m, tiny, corpus: ["export", copy(m["checkpoint"], t / "ck.safetensors"),
                                                      "--store", copy(m["store"], t / "s.zarr"), "-o", t / "out"],
    "classify": lambda t, m, tiny, corpus: ["classify", copy(m["checkpoint"], t / "ck.safetensors"),
                                            "-o", t / "out.jsonl"],
}


def output_of(args) -> Path:
    return Path(args[args.index("-o") + 1])


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_second_writer_of_one_output_stops_at_once(tmp_path, made, tiny, corpus_file, command):
    args = WRITERS[command](tmp_path, made, tiny, corpus_file)
    out = output_of(args)
    with files.output_lock(out):  # the first writer, still at work
        before = tree(tmp_path)
        result = xc(args)
        assert_one_line(result, 2, "is being written by another xc process", str(os.getpid()))
        assert tree(tmp_path) == before
    if command == "export neuronpedia":  # it would go on to need the synthetic models' tokenizer
        return
    result = xc([*args, "-q"])  # once the first writer is gone, the same command runs
    assert result.exit_code == 0, result.stderr
    assert out.exists() and not out.with_name(f".{out.name}.lock").exists()


# -- text that is not UTF-8 ---------------------------------------------------------------------------

LATIN1 = "caf\xe9 na\xefve\n".encode("latin-1")


def not_utf8_file(t, m, tiny, corpus):
    (t / "corpus.txt").write_bytes(b"good line\n" + LATIN1)
    return harvest_args(tiny, t / "corpus.txt", t / "out.zarr"), None


def not_utf8_in_folder(t, m, tiny, corpus):
    (t / "docs").mkdir()
    (t / "docs" / "a.txt").write_text("fine text\n")
    (t / "docs" / "b.txt").write_bytes(LATIN1)
    return harvest_args(tiny, t / "docs", t / "out.zarr"), None


def not_utf8_corpus_on_stdin(t, m, tiny, corpus):
    return harvest_args(tiny, "-", t / "out.zarr"), LATIN1


def not_utf8_prompts(t, m, tiny, corpus):
    (t / "prompts.txt").write_bytes(LATIN1)
    return ["amplify", "--before", tiny["gpt2"], "--after", tiny["gpt2_b"], "--alpha", "1",
            "--prompts", t / "prompts.txt"], None


def not_utf8_path_for_classify(t, m, tiny, corpus):
    return ["classify", "-"], b"\xff\xfe/ck.safetensors\n"


def not_utf8_path_for_export(t, m, tiny, corpus):
    return ["export", "-", "--format", "saelens", "-o", t / "out"], b"\xffck.safetensors\n"


NOT_UTF8 = [not_utf8_file, not_utf8_in_folder, not_utf8_corpus_on_stdin, not_utf8_prompts,
            not_utf8_path_for_classify, not_utf8_path_for_export]


@pytest.mark.parametrize("case", NOT_UTF8, ids=[c.__name__ for c in NOT_UTF8])
def test_text_that_is_not_utf8_is_one_line_and_writes_nothing(tmp_path, made, tiny, corpus_file, case):
    args, stdin = case(tmp_path, made, tiny, corpus_file)
    before = tree(tmp_path)
    result = xc(args, input=stdin)
    assert_one_line(result, 2, "UTF-8")
    assert tree(tmp_path) == before


# -- non-finite numbers: every float option of every command ---------------------------------------------

def float_options():
    for name, command in sorted(cli.commands.items()):
        for param in command.params:
            if isinstance(param, __import__("click").Option) and isinstance(param.type, FiniteFloat):
                yield name, param.opts[-1] if param.opts[-1].startswith("--") else param.opts[0]


FLOAT_OPTIONS = list(float_options())


def test_the_float_options_are_found():
    """The table below is generated; make sure it is not empty because the type changed."""
    names = {f"{c} {o}" for c, o in FLOAT_OPTIONS}
    assert {"train --lr", "synth --noise", "amplify --temperature"} <= names, names


@pytest.mark.parametrize("command, flag", FLOAT_OPTIONS, ids=[f"{c} {o}" for c, o in FLOAT_OPTIONS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_option_refuses_non_finite_numbers(tmp_path, command, flag, value):
    result = xc([command, f"{flag}={value}"], catch_exceptions=False)  # parsed before anything is read
    assert_one_line(result, 2, flag, "not a finite number")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["synth", "diff", "--magnitude", "0.5,inf"], "--magnitude 0.5,inf must be finite"),
])
def test_lists_of_numbers_refuse_non_finite_values(tmp_path, args, fragment):
    result = xc([*args, *(["-o", tmp_path / "out"] if args[0] == "synth" else [])])
    assert_one_line(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


# -- a full disk: a small tmpfs where the machine lets us mount one ----------------------------------------

@contextlib.contextmanager
def small_disk(path: Path, size: str):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


FILLERS = {
    "synth": lambda disk, m, tiny, corpus: ["synth", "diff", "--tokens", "65536", "-o", disk / "out.zarr"],
    "train": lambda disk, m, tiny, corpus: ["train", m["store"], "-o", disk / "out.safetensors", "--steps", "2",
                                            "--latents", "8192", "--k", "4"],
    "export": lambda disk, m, tiny, corpus: ["export", m["checkpoint"], "--format", "saelens", "-o", disk / "out"],
    "classify": lambda disk, m, tiny, corpus: ["classify", m["checkpoint"], "--store", m["store"],
                                               "-o", disk / "out.jsonl"],
}


@pytest.mark.parametrize("command", list(FILLERS))
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, made, tiny, corpus_file, command):
    with small_disk(tmp_path / "disk", "4k") as disk:
        result = xc([*FILLERS[command](disk, made, tiny, corpus_file), "-q"])  # -q: errors only
        assert_one_line(result, 1, "no space left on device")
        assert list(disk.iterdir()) == []  # no output, no temp


def test_a_harvest_stopped_by_a_full_disk_resumes_to_the_same_store(tmp_path, tiny, corpus_file):
    import numpy as np
    import zarr

    roomy = tmp_path / "roomy.zarr"
    args = harvest_args(tiny, corpus_file, roomy)[:-2] + ["--tokens", "4000", "--chunk-rows", "512"]
    assert xc(args).exit_code == 0
    with small_disk(tmp_path / "disk", "48k") as disk:
        out = disk / "out.zarr"
        args[args.index("-o") + 1] = out
        result = xc(args)
        assert_one_line(result, 1, "no space left on device", str(out), "--resume")
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        result = xc([*args, "--resume", "-q"])
        assert result.exit_code == 0, result.stderr
        a, b = zarr.open_group(str(roomy), mode="r"), zarr.open_group(str(out), mode="r")
        for path in ["tokens", *(f"acts/{s['name']}" for s in a.attrs["xc"]["sources"])]:
            np.testing.assert_array_equal(a[path][:], b[path][:], err_msg=path)
        assert b.attrs["xc"]["complete"]


def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, made):
    with small_disk(tmp_path / "disk", "1m") as disk:
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = xc(["train", made["store"], "-o", disk / "out.safetensors", "--steps", "2", "--latents", "16",
                     "--k", "4"])
        assert_one_line(result, 2, "is not writable", str(disk))


def test_machine_refusals_are_named_with_the_output_and_not_the_temp(tmp_path):
    temp = files.temp_path_for(tmp_path / "out.zarr") / "acts" / "c" / "0"
    line = files.machine_refusal(OSError(28, "No space left on device", str(temp)))
    assert line == f"no space left on device: {str(tmp_path / 'out.zarr' / 'acts' / 'c' / '0')!r}"
    assert files.machine_refusal(RuntimeError("I/O error: No space left on device (os error 28)"))
    assert files.machine_refusal(ValueError("bad value")) is None
    assert files.machine_refusal(OSError(2, "No such file or directory", "x")) is None  # not the machine's


# -- damage that hypothesis generates ---------------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=True)
    | st.sampled_from(["", "../x", "/abs", "a" * 300, "relu", "batchtopk", "a.resid_post.0"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)


def key_paths(value, prefix=()):
    """Every place in a JSON value that can be replaced: dict keys and list items, depth first."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield (*prefix, k)
            yield from key_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield (*prefix, i)
            yield from key_paths(v, (*prefix, i))


def replaced(value, path, new):
    value = json.loads(json.dumps(value))
    where = value
    for key in path[:-1]:
        where = where[key]
    if new is DELETE:
        del where[path[-1]]
    else:
        where[path[-1]] = new
    return value


DELETE = object()
# Derandomized, so that CI runs the same cases every time; XC_FUZZ_EXAMPLES=500 searches further.
FUZZ = settings(max_examples=int(os.environ.get("XC_FUZZ_EXAMPLES", 25)), deadline=None, derandomize=True,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def exits_cleanly(args) -> None:
    """Accepted (0) or refused with one line (2): never an internal error, never a traceback."""
    result = xc(args)
    if result.exit_code not in (0, 2):
        pytest.fail(f"exit {result.exit_code}: {xc([*args, '--debug']).stderr}")
    if result.exit_code == 2:
        assert_one_line(result, 2)
    return result


@FUZZ
@given(choice=st.integers(0, 10 ** 6), new=JSON_VALUES | st.just(DELETE))
def test_checkpoint_metadata_with_any_one_field_changed_loads_or_is_refused(made, tmp_path_factory, choice, new):
    with safe_open(str(made["checkpoint"]), framework="pt") as f:
        meta = json.loads(f.metadata()["xc"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    paths = list(key_paths(meta))
    meta = replaced(meta, paths[choice % len(paths)], new)
    root = tmp_path_factory.mktemp("fuzz-ck")
    path = root / "ck.safetensors"
    save_file(tensors, str(path), metadata={"xc": json.dumps(meta)})
    before = tree(root)
    exits_cleanly(["classify", path, "-q"])
    exits_cleanly(["eval", path, made["store"], "-q"])
    assert tree(root) == before


@FUZZ
@given(choice=st.integers(0, 10 ** 6), new=JSON_VALUES | st.just(DELETE))
def test_store_attributes_with_any_one_field_changed_open_or_are_refused(made, tmp_path_factory, choice, new):
    root = tmp_path_factory.mktemp("fuzz-store")
    store = copy(made["store"], root / "s.zarr")
    doc = json.loads((store / "zarr.json").read_text())
    paths = [("attributes", *p) for p in key_paths(doc["attributes"])]
    doc = replaced(doc, paths[choice % len(paths)], new)
    (store / "zarr.json").write_text(json.dumps(doc))
    before = tree(root)
    exits_cleanly(["info", store])
    exits_cleanly(["classify", made["checkpoint"], "--store", store, "-q"])
    assert tree(root) == before


@FUZZ
@given(seed=st.integers(0, 2 ** 32 - 1), how=st.sampled_from(["flip", "truncate", "append", "empty"]))
def test_damaged_bytes_in_any_store_file_are_read_or_refused(made, tmp_path_factory, seed, how):
    """Any file of the store (chunk, array or group metadata) with bytes flipped, cut or added."""
    root = tmp_path_factory.mktemp("fuzz-bytes")
    store = copy(made["store"], root / "s.zarr")
    rng = random.Random(seed)
    target = rng.choice(sorted(p for p in store.rglob("*") if p.is_file()))
    data = bytearray(target.read_bytes())
    if how == "flip" and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        data = data[:rng.randrange(len(data) + 1)]
    elif how == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        data = bytearray()
    target.write_bytes(bytes(data))
    before = tree(root)
    for args in (["info", store], ["classify", made["checkpoint"], "--store", store, "-q"],
                 ["eval", made["checkpoint"], store, "--all-rows", "-q"]):
        result = exits_cleanly(args)
        if result.exit_code == 0 and args[0] != "info":
            for line in result.stdout.splitlines():  # strict JSON, even when flipped bits made NaN
                json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line[:80]}"))
    assert tree(root) == before


def test_json_outputs_write_non_finite_numbers_as_null():
    from xcli import strict_json

    text = strict_json.dumps({"fvu": math.nan, "l0": [1.0, math.inf, -math.inf], "ok": 0.5, "n": 3})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"fvu": None, "l0": [1.0, None, None],
                                                                         "ok": 0.5, "n": 3}


@pytest.mark.parametrize("stats", [None, "x", {"a.synthetic.0": {"count": 2048, "mean": "../../etc", "mean_sq_norm": 1}},
                                   {"a.synthetic.0": {"count": "2048", "mean": 3, "mean_sq_norm": "nan"}}])
def test_recorded_statistics_that_are_not_whole_are_recomputed(made, tmp_path, stats):
    """Found by the fuzz test above: the statistics are a cache, never trusted."""
    store = copy(made["store"], tmp_path / "s.zarr")
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["xc"]["stats"] = stats
    (store / "zarr.json").write_text(json.dumps(doc))
    assert xc(["info", store]).exit_code == 0
    fresh = xc(["classify", made["checkpoint"], "--store", made["store"], "-q"]).stdout
    assert xc(["classify", made["checkpoint"], "--store", store, "-q"]).stdout == fresh
