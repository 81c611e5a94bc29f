"""Stores at s3:// URLs, against a real S3 API: moto's server on 127.0.0.1 (the `s3` fixture, conftest.py).

Harvest writes the store there and the readers (info, train, eval, classify, export) read it; the store
equals one harvested to local disk, a harvest killed with SIGKILL resumes to the uninterrupted result,
and the rules for existing outputs and for one writer hold without renames or OS locks.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from s3_server import BUCKET

import tiny_models
from xcli import remote
from xcli.cli import cli
from xcli.data import store as st

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

HARVEST = ["--layers", "0,2", "-c", "16", "-b", "3", "--chunk-rows", "64"]


def invoke(args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], **kwargs)


def assert_bad_input(result, fragment):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr, result.stderr


def assert_same_store(a: st.ActivationStore, b: st.ActivationStore):
    assert a.complete and b.complete and a.n_tokens == b.n_tokens > 0 and a.names == b.names
    for name in a.names:
        assert np.array_equal(a.read(name, 0, a.n_tokens), b.read(name, 0, b.n_tokens))
    for key, values in a.token_arrays().items():
        assert np.array_equal(values, b.token_arrays()[key])
    assert a.meta["stats"] == b.meta["stats"]


@pytest.fixture(scope="module")
def harvested(s3, tiny, corpus_file, tmp_path_factory):
    """One store harvested to S3 and the same harvest to local disk."""
    local = tmp_path_factory.mktemp("local") / "acts.zarr"
    args = ["harvest", "-m", f"a={tiny['gpt2']}", "-m", f"b={tiny['gpt2_b']}", *HARVEST, "-d", corpus_file]
    url = f"s3://{BUCKET}/harvested/acts.zarr"
    result = invoke([*args, "-o", url, *s3["option"]])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == url
    assert invoke([*args, "-o", local]).exit_code == 0
    return {"args": args, "url": url, "local": local}


def test_harvest_to_s3_equals_a_local_harvest(s3, harvested):
    remote_store = st.open_store(harvested["url"])
    assert_same_store(remote_store, st.open_store(harvested["local"]))
    fs = remote.filesystem("s3")
    keys = fs.find(f"{BUCKET}/harvested")
    assert f"{BUCKET}/harvested/acts.zarr/zarr.json" in keys
    assert not any("progress" in k or k.endswith(".lock") or ".tmp-" in k for k in keys)  # nothing left over
    # A real client reads it: zarr-python through fsspec, with the committed rows the attributes say.
    group = zarr.open_group(zarr.storage.FsspecStore.from_url(
        harvested["url"], storage_options={"endpoint_url": s3["endpoint"]}, read_only=True), mode="r")
    meta = group.attrs["xc"]
    assert meta["complete"] is True and meta["n_tokens"] == remote_store.n_tokens
    assert group["acts/a.resid_post.0"].shape == (meta["n_tokens"], 32)

    result = invoke(["info", harvested["url"], "--json", *s3["option"]])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == harvested["url"] and info["n_tokens"] == remote_store.n_tokens and info["complete"]
    assert info["bytes_on_disk"] == fs.du(f"{BUCKET}/harvested/acts.zarr") > 0


def test_existing_outputs_at_s3_follow_the_local_rules(s3, harvested, tiny, corpus_file):
    args, url = harvested["args"], harvested["url"]
    before = {k: v["LastModified"] for k, v in remote.filesystem("s3").find(url, detail=True).items()}
    result = invoke([*args, "-o", url, *s3["option"]])  # same arguments, complete: nothing to do
    assert result.exit_code == 0 and result.stdout.strip() == url
    assert_bad_input(invoke([*args, "--tokens", "50", "-o", url, *s3["option"]]), "written with other arguments")
    after = {k: v["LastModified"] for k, v in remote.filesystem("s3").find(url, detail=True).items()}
    assert after == before
    # --overwrite replaces only what xc wrote: objects under a prefix without xc's attributes stay.
    foreign = f"s3://{BUCKET}/foreign.zarr"
    remote.filesystem("s3").pipe_file(f"{BUCKET}/foreign.zarr/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')
    assert_bad_input(invoke([*args, "-o", foreign, "--overwrite", *s3["option"]]), "is not an xc store")
    assert remote.filesystem("s3").exists(f"{BUCKET}/foreign.zarr/zarr.json")
    assert_bad_input(invoke([*args, "-o", "s3://no-such-bucket-xc/a.zarr", *s3["option"]]), "does not exist")
    assert_bad_input(invoke(["info", f"s3://{BUCKET}/nothing.zarr", *s3["option"]]), "does not exist")
    # A store replaced by --overwrite is replaced whole: no chunk of the old one survives.
    small = f"s3://{BUCKET}/small.zarr"
    assert invoke([*args, "-o", small, *s3["option"]]).exit_code == 0
    assert invoke([*args, "--tokens", "70", "-o", small, "--overwrite", *s3["option"]]).exit_code == 0
    store = st.open_store(small)
    assert store.n_tokens == 70 and len(remote.filesystem("s3").ls(f"{BUCKET}/small.zarr/acts/a.resid_post.0/c")) == 2


def test_one_writer_per_output_at_s3(s3, harvested, tiny, corpus_file):
    """The lock object: one held by a live writer elsewhere is refused; one left by a dead process here is taken."""
    fs, url = remote.filesystem("s3"), f"s3://{BUCKET}/locked.zarr"
    lock = f"{BUCKET}/.locked.zarr.lock"
    fs.pipe_file(lock, json.dumps({"host": "another-machine", "pid": 1}).encode())
    assert_bad_input(invoke([*harvested["args"], "-o", url, *s3["option"]]), "another xc process")
    assert not fs.exists(f"{BUCKET}/locked.zarr")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fs.pipe_file(lock, json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    result = invoke([*harvested["args"], "-o", url, *s3["option"]])
    assert result.exit_code == 0, result.stderr
    fs.invalidate_cache()
    assert not fs.exists(lock) and st.open_store(url).complete


def test_train_eval_classify_and_export_read_from_s3(s3, harvested, tmp_path):
    url, opt = harvested["url"], s3["option"]
    checkpoint = tmp_path / "xc.safetensors"
    result = invoke(["train", url, "-o", checkpoint, "--steps", "4", "--latents", "16", "--k", "4",
                     "--batch-size", "32", "--eval-fraction", "0.2", *opt])
    assert result.exit_code == 0, result.stderr
    local_checkpoint = tmp_path / "local.safetensors"
    assert invoke(["train", harvested["local"], "-o", local_checkpoint, "--steps", "4", "--latents", "16",
                   "--k", "4", "--batch-size", "32", "--eval-fraction", "0.2"]).exit_code == 0
    from safetensors.numpy import load_file

    # The same rows in the same order: training from S3 gives the checkpoint training from disk gives.
    a, b = load_file(checkpoint), load_file(local_checkpoint)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    result = invoke(["eval", checkpoint, url, *opt])
    assert result.exit_code == 0, result.stderr
    remote_eval = json.loads(result.stdout.strip().splitlines()[-1])
    local_eval = json.loads(invoke(["eval", local_checkpoint, harvested["local"]]).stdout.strip().splitlines()[-1])
    assert remote_eval["stores"] == [url] and remote_eval["rows"] == "held-out"  # the rows training held out
    for report in (remote_eval, local_eval):
        del report["checkpoint"], report["stores"]
    assert remote_eval == local_eval

    result = invoke(["classify", checkpoint, "--store", url, "--models", "a,b", *opt])
    assert result.exit_code == 0, result.stderr
    local = invoke(["classify", local_checkpoint, "--store", harvested["local"], "--models", "a,b"])
    assert result.stdout == local.stdout and result.stdout.count("\n") == 16

    out = tmp_path / "np"
    result = invoke(["export", checkpoint, "--store", url, "-o", out, "--model-id", "a=tiny-a",
                     "--model-id", "b=tiny-b", "--top-k", "3", *opt])
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "xc-export.json").read_text())
    assert manifest["identity"]["store"] == url
    assert manifest["identity"]["store_tokens"] == st.open_store(url).n_tokens


def test_synth_writes_its_store_and_truth_to_s3_and_eval_reads_the_truth_there(s3, tmp_path):
    args = ["synth", "diff", "--tokens", "2048", "--chunk-rows", "1024", "--width", "8", "--shared", "6",
            "--exclusive", "2", "--scaled", "0"]
    url, local = f"s3://{BUCKET}/synth/toy.zarr", tmp_path / "toy.zarr"
    result = invoke([*args, "--seed", "1", "-o", url, *s3["option"]])
    assert result.exit_code == 0 and result.stdout.strip() == url, result.stderr
    assert st.open_store(url).meta["synthetic"]["seed"] == 1
    assert_bad_input(invoke([*args, "-o", url, *s3["option"]]), "already exists")
    assert invoke([*args, "-o", url, "--overwrite", *s3["option"]]).exit_code == 0  # seed 0 now

    assert invoke([*args, "-o", local]).exit_code == 0
    assert_same_store(st.open_store(url), st.open_store(local))
    fs = remote.filesystem("s3")
    assert fs.cat_file(f"{BUCKET}/synth/toy.zarr.truth.safetensors") == (tmp_path / "toy.zarr.truth.safetensors").read_bytes()
    assert not fs.exists(f"{BUCKET}/synth/.toy.zarr.lock")

    # xc eval scores a crosscoder against the truth at the URL as against the local one.
    checkpoint = tmp_path / "toy.safetensors"
    assert invoke(["train", local, "-o", checkpoint, "--latents", "16", "--k", "2", "--steps", "20", "--batch-size",
                   "256", "--device", "cpu"]).exit_code == 0
    there = invoke(["eval", checkpoint, url, "--truth", f"{url}.truth.safetensors", *s3["option"]])
    here = invoke(["eval", checkpoint, local, "--truth", f"{local}.truth.safetensors"])
    assert there.exit_code == 0, there.stderr
    assert json.loads(there.stdout)["truth"] == json.loads(here.stdout)["truth"]


def test_killed_harvest_at_s3_resumes_to_equal_an_uninterrupted_run(s3, tiny, tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(tiny_models.corpus_lines(300, seed=5)) + "\n")
    args = ["harvest", "-m", str(tiny["gpt2"]), "-m", f"b={tiny['gpt2_b']}", "--layers", "0,2", "-c", "64",
            "-b", "4", "--chunk-rows", "256", "-d", str(corpus), *s3["option"]]
    whole, killed = f"s3://{BUCKET}/whole.zarr", f"s3://{BUCKET}/killed.zarr"
    assert invoke([*args, "-o", whole]).exit_code == 0
    proc = subprocess.Popen([sys.executable, "-m", "xcli", *args, "-o", killed], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    fs, deadline, committed = remote.filesystem("s3"), time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = json.loads(fs.cat_file(f"{BUCKET}/killed.zarr/zarr.json"))["attributes"]["xc"]["n_tokens"]
        except (FileNotFoundError, KeyError, ValueError):  # not created yet
            committed = 0
        if committed >= 512:
            break
        time.sleep(0.01)
    proc.kill()
    assert proc.wait() == -9, proc.stderr.read()
    partial = st.open_store(killed)
    assert not partial.complete and partial.n_tokens >= 512 and partial.n_tokens % 256 == 0
    assert fs.exists(f"{BUCKET}/.killed.zarr.lock")  # the killed writer's lock object is left behind
    assert_bad_input(invoke([*args, "-o", killed]), "--resume")

    result = invoke([*args, "-o", killed, "--resume"])  # takes over the dead writer's lock
    assert result.exit_code == 0, result.stderr
    resumed = st.open_store(killed)
    assert resumed.n_tokens > partial.n_tokens
    assert_same_store(resumed, st.open_store(whole))


def test_a_url_without_its_backend_is_one_line(tmp_path):
    """Without the s3 extra (s3fs cannot be imported), a store URL names the extra to install; exit 2."""
    code = ("import sys; sys.modules['s3fs'] = None; sys.argv = ['xc'] + sys.argv[1:]; "
            "from xcli.cli import main; main()")
    for args in (["info", "s3://bucket/acts.zarr"], ["train", "s3://bucket/acts.zarr", "-o", str(tmp_path / "x")]):
        done = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            "xc: error: stores at s3:// URLs need an optional package: pip install 'xcli[s3]'"], done.stderr
        assert done.stdout == ""


def test_storage_option_must_be_key_value():
    result = invoke(["info", "s3://bucket/acts.zarr", "--storage-option", "endpoint_url"])
    assert result.exit_code == 2 and "KEY=VALUE" in result.stderr
    assert remote.parse_storage_option('anon=true') == ("anon", True)
    assert remote.parse_storage_option("endpoint_url=http://h:1/x=y") == ("endpoint_url", "http://h:1/x=y")


def test_two_ranks_under_torchrun_write_one_store_at_s3(s3, harvested):
    """Each rank writes its own chunk objects and records; rank 0 holds the lock and finishes the store,
    which equals the one-process harvest on local disk."""
    url = f"s3://{BUCKET}/ranks.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "xcli", *harvested["args"], "-o", url, *s3["option"]],
                          check=False, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == url
    a, b = st.open_store(url), st.open_store(harvested["local"])
    assert a.meta == b.meta  # n_tokens, statistics bit for bit, harvest arguments
    assert_same_store(a, b)
    fs = remote.filesystem("s3")
    fs.invalidate_cache()
    assert not fs.exists(f"{BUCKET}/ranks.zarr/{st.PROGRESS}") and not fs.exists(f"{BUCKET}/.ranks.zarr.lock")
