"""Model parallel over sources (`xc train --split-sources` under torchrun): the balanced
contiguous assignment, the refusals, and 2-process gloo runs that match one process and
resume exactly after kill -9."""

import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import ENV, kill_job_when, saved_step
from xcli.cli import cli
from xcli.crosscoder.model import Crosscoder
from xcli.crosscoder.source_parallel import SourceShard, assign, parameter_names
from xcli.data import synth
from xcli.distributed import SINGLE
from xcli.errors import BadInput
from xcli.source import Source
from xcli.train import loop as tr


def brute_force_largest_group(costs: list[int], world: int) -> int:
    """The smallest possible largest group cost over every split into `world` contiguous groups."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), world - 1):
        bounds = (0, *cuts, len(costs))
        largest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = largest if best is None else min(best, largest)
    return best


@pytest.mark.parametrize("widths, world", [([8, 8, 8, 8, 8, 8, 8], 3), ([1, 9, 2, 2, 7, 3], 3), ([5, 1, 1, 1], 2),
                                           ([4, 4], 2), ([3, 1, 4, 1, 5, 9, 2, 6], 4), ([2, 3], 1)])
def test_sources_are_split_into_contiguous_groups_with_the_smallest_largest_group(widths, world):
    names = [f"s{i}" for i in range(len(widths))]
    groups = assign(dict(zip(names, widths)), names, names, world)
    assert [n for g in groups for n in g] == names and len(groups) == world and all(groups)
    largest = max(sum(2 * widths[names.index(n)] for n in g) for g in groups)
    assert largest == brute_force_largest_group([2 * w for w in widths], world)


def test_26_equal_layers_on_8_ranks_hold_at_most_4_layers_each():
    names = [f"gemma.resid_post.{i}" for i in range(26)]
    groups = assign(dict.fromkeys(names, 2304), names, names, 8)
    assert sorted(len(g) for g in groups) == [3, 3, 3, 3, 3, 3, 4, 4]


def test_bad_splits_are_refused():
    with pytest.raises(BadInput, match="each of the 3 ranks at least one source, and there are 2"):
        assign({"a": 4, "b": 4}, ["a", "b"], ["a", "b"], 3)
    with pytest.raises(BadInput, match="rank 0 would own a"):  # a transcoder: a is only read, b only written
        assign({"a": 4, "b": 4}, ["a"], ["b"], 2)


def test_the_whole_crosscoders_parameter_order_is_known_to_every_rank():
    sources = [Source(n, n, "synthetic", None, d) for n, d in (("a", 3), ("b.x", 2), ("c", 4))]
    model = Crosscoder(sources, 8, "topk", 2, ["a", "c"], ["b.x", "c"])
    shard = SourceShard(SINGLE, [["a", "b.x", "c"]], torch.device("cpu"), sources, 8, "topk", 2, ["a", "c"], ["b.x", "c"])
    names = ["encoder_bias", "encoder.a", "encoder.c", "decoder.b.x", "decoder.c", "decoder_bias.b.x", "decoder_bias.c"]
    assert parameter_names(model) == shard.parameter_keys == names
    assert [p.shape for p in model.parameters()] == [(8,), (3, 8), (4, 8), (8, 2), (8, 4), (2,), (4,)]


@pytest.mark.parametrize("extra, message", [
    (["--arch", "relu"], "--split-sources trains --arch topk or batchtopk, not relu"),
    (["--arch", "fmx"], "not fmx"),
    (["--mask-prob", "0.1"], "--mask-prob does not combine with --split-sources"),
])
def test_unsupported_options_are_one_line_exit_2(tmp_path, extra, message):
    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=256, d=4, n_shared=2, n_exclusive=1, chunk_rows=64)
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--split-sources", *extra])
    assert result.exit_code == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not out.exists()


def test_more_ranks_than_sources_stops_each_rank_before_they_meet(tmp_path):
    """What each torchrun worker does: one line, exit 2, before the process group forms (no hang)."""
    store = tmp_path / "one.zarr"
    synth.make_store(store, n_tokens=256, sources=("a",), d=4, n_shared=2, n_exclusive=1, chunk_rows=64)
    out = tmp_path / "x.safetensors"
    env = {**ENV, "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    proc = subprocess.run([sys.executable, "-m", "xcli", "train", str(store), "-o", str(out), "--split-sources",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "xc: error: --split-sources gives each of the 2 ranks at least one source, and there are 1 (a); "
        "use --nproc-per-node 1 or fewer"]
    assert not out.exists()


ARGS = dict(latents=24, k=3, batch_size=64, steps=60, checkpoint_every=20, log_every=5, eval_fraction=0.125,
            dead_tokens=128, shuffle_buffer=256, device="cpu", dtype="float32")


def torchrun(store, out, arch, *extra, **overrides):
    options = [f"--{k.replace('_', '-')}={v}" for k, v in {**ARGS, **overrides}.items()]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "xcli", "train", str(store), "-o", str(out), "--arch", arch, *options, "--split-sources", *extra]


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    """Sources of unequal widths, so that the ranks hold different numbers of them."""
    store = tmp_path_factory.mktemp("split") / "s.zarr"
    synth.make_store(store, n_tokens=2048, sources=("a", "b.x", "c"), d={"a": 8, "b.x": 6, "c": 10}, n_shared=4,
                     n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    return store


@pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc")
def test_batchtopk_split_over_two_processes_matches_one_process_and_resumes_exactly_after_kill_9(
        tmp_path, three_sources):
    # BatchTopK with AuxK active (dead latents): the residual variance and dv_n cross the ranks.
    assert assign({"a": 8, "b.x": 6, "c": 10}, ["a", "b.x", "c"], ["a", "b.x", "c"], 2) == [["a", "b.x"], ["c"]]
    reference = tr.train(tr.TrainConfig(stores=(str(three_sources),), output=str(tmp_path / "one.safetensors"),
                                        arch="batchtopk", log=str(tmp_path / "one.jsonl"), **ARGS))
    two = tmp_path / "two.safetensors"
    proc = subprocess.run(torchrun(three_sources, two, "batchtopk", "--log-file", str(tmp_path / "two.jsonl")),
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{two}\n"
    expected = load_file(reference)
    got = load_file(two)
    assert got.keys() == expected.keys()  # an ordinary checkpoint: every source, written by rank 0
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert aux_was_active(tmp_path / "one.jsonl")
    one_log = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two_log = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(two_log) == len(one_log) == 12 + 3  # one writer: 12 train, 3 eval lines
    for a, b in zip(one_log, two_log):  # metrics over all sources, whichever rank holds them
        assert a.keys() == b.keys()
        for key in ("loss", "recon", "aux", "l0", "fvu_total", "dead_fraction"):
            if key in a:  # train lines have all, eval lines the last three
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
        assert b["fvu"].keys() == {"a", "b.x", "c"}
    with safe_open(str(two), framework="pt") as f, safe_open(str(reference), framework="pt") as g:
        split_meta, one_meta = json.loads(f.metadata()["xc"]), json.loads(g.metadata()["xc"])
    assert split_meta["sources"] == one_meta["sources"] and split_meta["hyperparameters"] == one_meta["hyperparameters"]
    assert split_meta["training"]["fvu_total"] == pytest.approx(one_meta["training"]["fvu_total"], rel=1e-4)

    # kill -9 torchrun and its workers after the first checkpoint; resume.
    killed = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(torchrun(three_sources, killed, "batchtopk"), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kill_job_when(proc, lambda: saved_step(killed) >= 0, timeout=120)
    proc.communicate()
    assert 0 < saved_step(killed) < 60
    # The state is the usual one: one process resumes it too (up to float rounding).
    alone = tmp_path / "alone.safetensors"
    shutil.copy(tr.state_path(killed), tr.state_path(alone))
    if killed.exists():  # (a kill between writing the state and the checkpoint leaves only the state)
        shutil.copy(killed, alone)
    tr.train(tr.TrainConfig(stores=(str(three_sources),), output=str(alone), arch="batchtopk", resume=True, **ARGS))
    for key, value in load_file(alone).items():
        torch.testing.assert_close(value, got[key], rtol=1e-5, atol=1e-6, msg=key)
    proc = subprocess.run(torchrun(three_sources, killed, "batchtopk", "--resume"), env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for key, value in load_file(killed).items():
        assert torch.equal(value, got[key]), key


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU")
def test_topk_split_over_two_processes_matches_one_process(tmp_path, three_sources):
    short = dict(steps=30, checkpoint_every=30, log_every=10)
    reference = tr.train(tr.TrainConfig(stores=(str(three_sources),), output=str(tmp_path / "one.safetensors"),
                                        arch="topk", **{**ARGS, **short}))
    two = tmp_path / "two.safetensors"
    proc = subprocess.run(torchrun(three_sources, two, "topk", **short), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = load_file(reference)
    for key, value in load_file(two).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def aux_was_active(log) -> bool:
    return any(json.loads(line).get("aux", 0) > 0 for line in log.read_text().splitlines())
