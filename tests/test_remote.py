"""Stores at URLs of any fsspec protocol, tested in-process with fsspec's memory:// file system.

tests/data/test_object_store.py runs the commands against a real S3 API (moto's server); gs:// and
az:// have no local server here. memory:// is another protocol than s3:// with its own spelling of
keys, so what passes here is not tied to S3: xc synth writes a store and its truth there, xc info
and xc eval read them back, and the rules for existing outputs and for one writer hold. Also: a
gs://, az:// or abfs:// URL without its back-end is one line naming the extra to install.
"""

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from xcli import remote
from xcli.cli import cli
from xcli.data.store import open_store
from xcli.data.synth import PlantedDictionary

SYNTH = ["synth", "diff", "--tokens", "3000", "--chunk-rows", "1024", "--width", "8", "--shared", "6",
         "--exclusive", "2", "--scaled", "0"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(result, fragment):
    assert result.exit_code == 2 and result.stdout == "", (result.exit_code, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr


@pytest.fixture
def bucket():
    """A fresh bucket of the in-process memory:// file system, emptied afterwards."""
    fs = remote.filesystem("memory")
    fs.mkdir("/xc-bucket")
    yield fs
    fs.rm("/xc-bucket", recursive=True)


def test_synth_writes_a_store_and_its_truth_at_a_url_as_on_disk(bucket, tmp_path):
    url = "memory://xc-bucket/toy.zarr"
    done = invoke(*SYNTH, "-o", url)
    assert done.exit_code == 0 and done.stdout.strip() == url, done.stderr
    local = tmp_path / "toy.zarr"
    assert invoke(*SYNTH, "-o", local).exit_code == 0

    there, here = open_store(url), open_store(local)
    assert there.complete and there.n_tokens == here.n_tokens == 3000 and there.names == here.names
    for name in here.names:
        assert np.array_equal(there.read(name, 0, 3000), here.read(name, 0, 3000))
    assert bucket.cat_file("/xc-bucket/toy.zarr.truth.safetensors") == (tmp_path / "toy.zarr.truth.safetensors").read_bytes()
    assert not bucket.exists("/xc-bucket/.toy.zarr.lock")  # the writer's lock object is gone
    info = json.loads(invoke("info", url, "--json").stdout)
    assert info["complete"] and info["n_tokens"] == 3000

    # The truth reads back from the URL as from disk (xc eval --truth takes either).
    truth = PlantedDictionary.load(f"{url}.truth.safetensors")
    assert truth.kinds == PlantedDictionary.load(f"{local}.truth.safetensors").kinds
    one_line(invoke("eval", "x.safetensors", url, "--truth", "memory://xc-bucket/none.truth.safetensors"),
             "does not exist")


def test_existing_outputs_and_one_writer_at_a_url(bucket):
    url = "memory://xc-bucket/toy.zarr"
    assert invoke(*SYNTH, "-o", url).exit_code == 0
    one_line(invoke(*SYNTH, "-o", url), "already exists; pass --overwrite")
    replaced = invoke(*SYNTH, "--seed", "1", "-o", url, "--overwrite")
    assert replaced.exit_code == 0, replaced.stderr
    assert open_store(url).meta["synthetic"]["seed"] == 1

    # --overwrite replaces only what xc wrote: not a foreign object where the truth goes ...
    bucket.pipe_file("/xc-bucket/toy.zarr.truth.safetensors", b"not a truth file")
    one_line(invoke(*SYNTH, "-o", url, "--overwrite"), "is not an xc synth truth file (not a safetensors file)")
    assert open_store(url).complete  # nothing was removed
    # ... nor a foreign store.
    bucket.pipe_file("/xc-bucket/foreign.zarr/zarr.json", b'{"zarr_format": 3, "node_type": "group"}')
    one_line(invoke(*SYNTH, "-o", "memory://xc-bucket/foreign.zarr", "--overwrite"), "is not an xc store")

    # A writer holds the output's lock object: a second one stops with one line.
    bucket.pipe_file("/xc-bucket/.held.zarr.lock", json.dumps({"host": "elsewhere", "pid": 1}).encode())
    one_line(invoke(*SYNTH, "-o", "memory://xc-bucket/held.zarr"), "is being written by another xc process")
    assert not bucket.exists("/xc-bucket/held.zarr")


@pytest.mark.parametrize("protocol,extra", [("gs", "gcs"), ("gcs", "gcs"), ("az", "azure"), ("abfs", "azure"),
                                            ("s3", "s3")])
def test_a_url_without_its_backend_is_one_line_naming_the_extra(protocol, extra, monkeypatch, tmp_path):
    """The back-end cannot be imported (as without the extra): reading and writing refuse alike."""
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is also a mapping)
    for module in ("gcsfs", "adlfs", "s3fs"):
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(registry._registry, protocol, raising=False)  # a back-end imported before
    url = f"{protocol}://bucket/acts.zarr"
    expected = f"xc: error: stores at {protocol}:// URLs need an optional package: pip install 'xcli[{extra}]'"
    for args in (("info", url), ("synth", "diff", "-o", url), ("train", url, "-o", tmp_path / "x.safetensors")):
        result = invoke(*args)
        assert result.exit_code == 2 and result.stderr.strip().splitlines() == [expected], (args, result.stderr)
