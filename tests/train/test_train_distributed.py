"""Data-parallel training: disjoint chunk shards that add up to the one-process batches, and a
2-process torchrun (gloo, CPU) run that matches one process and resumes exactly after kill -9."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import ENV, kill_job_when, saved_step
from test_train import row_store
from xcli.data import synth
from xcli.data.loader import BatchStream, StoreSet, train_eval_chunks
from xcli.train import loop as tr


@pytest.mark.parametrize("world, shuffle_rows", [(2, 250), (3, 250), (3, 100)])
def test_ranks_read_disjoint_chunks_and_their_shares_make_the_one_process_batches(tmp_path, world, shuffle_rows):
    stores = StoreSet([row_store(tmp_path / "rows.zarr")])  # 1037 rows in chunks of 100
    train_chunks, _ = train_eval_chunks(stores.n_chunks, 0.2)
    one = BatchStream(stores, ["a", "b"], train_chunks, 64, seed=5, shuffle_rows=shuffle_rows)
    reads = {r: [] for r in range(world)}
    ranks = []
    for r in range(world):
        shard = StoreSet([tmp_path / "rows.zarr"])
        original = shard.read_chunk_stored
        shard.read_chunk_stored = lambda c, names, r=r, original=original: reads[r].append(int(c)) or original(c, names)
        ranks.append(BatchStream(shard, ["a", "b"], train_chunks, 64, seed=5, shuffle_rows=shuffle_rows,
                                 rank=r, world=world))
    streams = [one.batches()] + [s.batches() for s in ranks]
    empty_shares, epoch_end = 0, None
    for step in range(40):  # about three epochs
        whole, *shares = [next(s) for s in streams]
        rows = whole.data["a"][:, 0].numpy()
        assert all(share.after == whole.after and share.rows == whole.rows == len(rows) for share in shares)
        mine = [share.data["a"][:, 0].numpy() for share in shares]
        assert sorted(np.concatenate(mine)) == sorted(rows)  # the shares add up to the one-process batch
        for share, rows_of_rank in zip(shares, mine):  # each in the one-process order, at its places
            np.testing.assert_array_equal(rows_of_rank, rows[np.isin(rows, rows_of_rank)])
            np.testing.assert_array_equal(rows_of_rank, rows[share.index])
        empty_shares += sum(len(m) == 0 for m in mine)
        if whole.after.epoch == 1 and epoch_end is None:  # in the first epoch, the ranks read disjoint chunks
            epoch_end = [sorted(reads[r]) for r in range(world)]
    everything = sorted(c for chunks in epoch_end for c in chunks)
    assert everything == sorted(train_chunks)  # each training chunk read once, by one rank
    if shuffle_rows == 100:  # one chunk per window: the other ranks sit those batches out
        assert empty_shares > 0


ARGS = ["--latents", "24", "--k", "3", "--batch-size", "64", "--steps", "60", "--checkpoint-every", "20",
        "--log-every", "5", "--eval-fraction", "0.125", "--dead-tokens", "128", "--shuffle-buffer", "256",
        "--device", "cpu", "--dtype", "float32"]


def torchrun(store, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "xcli", "train", str(store), "-o", str(out), *ARGS, *extra]


@pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc")
def test_two_process_run_matches_one_process_and_resumes_exactly_after_kill_9(tmp_path):
    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    # BatchTopK (selection over the whole batch, across ranks) with AuxK active (dead latents).
    reference = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / "one.safetensors"), latents=24,
                                        k=3, batch_size=64, steps=60, checkpoint_every=20, log_every=5,
                                        eval_fraction=0.125, dead_tokens=128, shuffle_buffer=256, device="cpu",
                                        dtype="float32"))
    two = tmp_path / "two.safetensors"
    proc = subprocess.run(torchrun(store, two, "--log-file", str(tmp_path / "two.jsonl")), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{two}\n"  # one rank prints
    expected = load_file(reference)
    for key, value in load_file(two).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 12 + 3  # one writer: 12 train, 3 eval lines

    # kill -9 torchrun and its workers after the first checkpoint; resume on two processes.
    killed = tmp_path / "killed.safetensors"
    proc = subprocess.Popen(torchrun(store, killed), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kill_job_when(proc, lambda: saved_step(killed) >= 0, timeout=120)
    proc.communicate()
    assert 0 < saved_step(killed) < 60
    proc = subprocess.run(torchrun(store, killed, "--resume"), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    uninterrupted = load_file(two)
    for key, value in load_file(killed).items():
        assert torch.equal(value, uninterrupted[key]), key


JUMPRELU_ARGS = ["--arch", "jumprelu", "--tanh-penalty", "0.5", "--latents", "24", "--batch-size", "64", "--steps",
                 "20", "--checkpoint-every", "20", "--log-every", "5", "--eval-fraction", "0.125", "--dead-tokens",
                 "128", "--shuffle-buffer", "256", "--device", "cpu", "--dtype", "float32"]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, as the test above")
def test_two_process_jumprelu_matches_one_process(tmp_path):
    """The dense JumpReLU loss (thresholds trained through the straight-through estimator) under DDP."""
    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    reference = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / "one.safetensors"), latents=24,
                                        arch="jumprelu", tanh_penalty=0.5, batch_size=64, steps=20,
                                        checkpoint_every=20, log_every=5, eval_fraction=0.125, dead_tokens=128,
                                        shuffle_buffer=256, device="cpu", dtype="float32"))
    two = tmp_path / "two.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "xcli",
               "train", str(store), "-o", str(two), *JUMPRELU_ARGS]
    proc = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = load_file(reference)
    assert expected["threshold"].shape == (24,)
    for key, value in load_file(two).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.skipif(sys.platform != "linux", reason="as above")
def test_two_process_matryoshka_run_matches_one_process(tmp_path):
    """The nested prefixes' losses are sums over rows: two ranks' shares add up to the one-process step."""
    store = tmp_path / "s.zarr"
    synth.make_store(store, n_tokens=1024, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    nested = ["--arch", "matryoshka", "--groups", "4,12", "--steps", "20"]
    reference = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / "one.safetensors"), latents=24,
                                        k=3, batch_size=64, steps=20, checkpoint_every=20, log_every=5,
                                        eval_fraction=0.125, dead_tokens=128, shuffle_buffer=256, device="cpu",
                                        dtype="float32", arch="matryoshka", groups=(4, 12)))
    two = tmp_path / "two.safetensors"
    proc = subprocess.run(torchrun(store, two, *nested), env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = load_file(reference)
    for key, value in load_file(two).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
