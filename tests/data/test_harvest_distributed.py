"""xc harvest under torchrun: ranks write disjoint chunks of one store that equals a one-process harvest,
and a store left by killed ranks resumes, with the same or another number of processes."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_models
from helpers import kill_job_when
from xcli.data import harvest as hv
from xcli.data import store as st
from xcli.data.harvest import HarvestConfig
from xcli.errors import BadInput

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(tiny_models.corpus_lines(100, seed=11)) + "\n")
    return path


def config(tiny, corpus, output, **kw) -> HarvestConfig:
    kw = {"layers": "0,2", "sites": ("resid_post", "mlp_out"), "context_length": 16, "batch_size": 2,
          "chunk_rows": 64, **kw}
    return HarvestConfig(models=(f"a={tiny['gpt2']}", f"b={tiny['gpt2_b']}"), data=str(corpus), output=output,
                         **kw)


def cli_args(tiny, corpus, output, *extra):
    return ["-m", "xcli", "harvest", "-m", f"a={tiny['gpt2']}", "-m", f"b={tiny['gpt2_b']}", "--layers", "0,2",
            "--site", "resid_post", "--site", "mlp_out", "-d", str(corpus), "-c", "16", "-b", "2",
            "--chunk-rows", "64", "-o", str(output), *extra]


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]


def assert_same_store(path, reference):
    """Row for row, the same store (hence the same rows up to order), with the same attributes and statistics."""
    a, b = st.open_store(path), st.open_store(reference)
    assert a.complete and a.n_tokens == b.n_tokens > 0
    assert a.meta == b.meta  # n_tokens, stats (float64, bit for bit), harvest arguments, ...
    for name in b.names:
        assert a.arrays[name].shape == (b.n_tokens, b.source(name).d)
        assert np.array_equal(a.arrays[name][:], b.arrays[name][:]), name
        assert np.array_equal(a.group[f"stats/{name}/mean"][:], b.group[f"stats/{name}/mean"][:])
    for key, values in b.token_arrays().items():
        assert a.group[key].shape == (b.n_tokens,)
        assert np.array_equal(a.token_arrays()[key], values), key
    assert not (Path(path) / st.PROGRESS).exists()


def one_process(tiny, corpus, root, **kw) -> Path:
    return hv.harvest(config(tiny, corpus, root / "one.zarr", **kw))


def start(cfg: HarvestConfig) -> None:
    run = hv.prepare(cfg)
    try:
        st.create_sharded(cfg.output, run.sources, hv.store_meta(run), dtype=run.store_dtype,
                          chunk_rows=cfg.chunk_rows, codec=cfg.codec)
    finally:
        run.close()


def as_rank(cfg: HarvestConfig, rank: int, world: int) -> int:
    """What one rank of a torchrun job does between the store's creation and its end."""
    run = hv.prepare(cfg)
    try:
        return run.stream_shard(st.ChunkWriter(cfg.output), rank, world)
    finally:
        run.close()


@pytest.mark.parametrize("world, options", [(2, {}), (3, {"tokens": 1000}),
                                            (2, {"keep_special_tokens": True, "batch_size": 3})])
def test_ranks_write_their_own_chunks_and_the_store_equals_one_process(tiny, corpus, tmp_path, monkeypatch,
                                                                       world, options):
    monkeypatch.setattr(hv, "BATCHES_PER_BLOCK", 3)  # blocks of 2 chunks here: many blocks, many straddles
    reference = one_process(tiny, corpus, tmp_path, **options)
    cfg = config(tiny, corpus, tmp_path / "ranks.zarr", **options)
    per_block = hv.block_chunks(cfg, 16)
    assert per_block == -(-3 * cfg.batch_size * 16 // 64)
    start(cfg)
    written, totals = set(), []
    for rank in reversed(range(world)):  # any order: the ranks do not depend on each other
        totals.append(as_rank(cfg, rank, world))
        mine = st.committed_chunks(cfg.output) - written
        assert mine and all((c // per_block) % world == rank for c in mine)
        written |= mine
    n_tokens = st.open_store(reference).n_tokens
    assert totals == [n_tokens] * world and written == set(range(-(-n_tokens // 64)))
    st.finish_sharded(cfg.output, n_tokens, corpus_exhausted="tokens" not in options)
    assert_same_store(cfg.output, reference)


def test_killed_ranks_resume_with_another_number_of_processes(tiny, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(hv, "BATCHES_PER_BLOCK", 3)
    reference = one_process(tiny, corpus, tmp_path)
    cfg = config(tiny, corpus, tmp_path / "ranks.zarr")
    start(cfg)
    as_rank(cfg, 0, 3)
    real_write, writes = st.ChunkWriter.write, []

    def write_then_die(self, index, acts, ids):  # rank 1 is killed after its second chunk
        if len(writes) == 2:
            raise KeyboardInterrupt
        writes.append(index)
        real_write(self, index, acts, ids)

    monkeypatch.setattr(st.ChunkWriter, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        as_rank(cfg, 1, 3)
    monkeypatch.setattr(st.ChunkWriter, "write", real_write)
    (cfg.output / st.PROGRESS / ".chunk-5.npz.99").write_bytes(b"torn")  # a record a kill cut short
    store = st.open_store(cfg.output)
    assert not store.complete and store.n_tokens == 0  # readers see no rows until it is finished
    held = len(st.committed_chunks(cfg.output))
    with pytest.raises(BadInput, match=f"incomplete \\({held} chunks written\\).*--resume"):
        hv.harvest(cfg)
    # one process continues it: the other ranks' chunks, then the finish
    assert hv.harvest(config(tiny, corpus, cfg.output, resume=True)) == cfg.output
    assert_same_store(cfg.output, reference)


def test_a_store_begun_by_one_process_is_continued_by_ranks(tiny, corpus, tmp_path, monkeypatch):
    reference = one_process(tiny, corpus, tmp_path)
    cfg = config(tiny, corpus, tmp_path / "begun.zarr")
    real, calls = hv.Run.activations, []

    def stop_after_20_batches(self, batch, keep):
        calls.append(1)
        if len(calls) > 20:
            raise KeyboardInterrupt
        return real(self, batch, keep)

    monkeypatch.setattr(hv.Run, "activations", stop_after_20_batches)
    with pytest.raises(KeyboardInterrupt):
        hv.harvest(cfg)
    monkeypatch.undo()
    begun = st.open_store(cfg.output).n_tokens
    assert begun > 0 and begun % 64 == 0
    st.make_sharded(cfg.output)  # rank 0, on --resume under torchrun
    st.make_sharded(cfg.output)  # as again after a kill: nothing changes
    assert st.committed_chunks(cfg.output) == set(range(begun // 64))
    n_tokens = [as_rank(cfg, rank, 2) for rank in range(2)]
    st.finish_sharded(cfg.output, n_tokens[0], corpus_exhausted=True)
    assert_same_store(cfg.output, reference)


@pytest.mark.skipif(sys.platform != "linux", reason="finds torchrun's workers through /proc")
def test_torchrun_harvest_killed_with_9_resumes_to_equal_one_process(tiny, corpus, tmp_path):
    """(An uninterrupted run is the same run with nothing committed before it.)"""
    reference = one_process(tiny, corpus, tmp_path)
    out = tmp_path / "two.zarr"
    proc = subprocess.Popen(torchrun(*cli_args(tiny, corpus, out)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    kill_job_when(proc, lambda: len(st.committed_chunks(out)) >= 2, timeout=60)  # once some chunks are committed
    assert proc.communicate()[0] == b""
    n_chunks = -(-st.open_store(reference).n_tokens // 64)
    assert 2 <= len(st.committed_chunks(out)) < n_chunks
    assert not st.open_store(out).complete
    proc = subprocess.run(torchrun(*cli_args(tiny, corpus, out, "--resume")), env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"  # rank 0 prints the path, the other rank nothing
    assert_same_store(out, reference)


def test_bad_input_under_torchrun_is_one_line_from_rank_0_and_leaves_nothing(tiny, corpus, tmp_path):
    out = tmp_path / "bad.zarr"
    args = cli_args(tiny, corpus, out)
    args[args.index("0,2")] = "0,9"  # every rank loads the models and finds no layer 9
    proc = subprocess.run(torchrun(*args), env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    ours = [line for line in proc.stderr.splitlines() if line.startswith("xc: ")]
    assert len(ours) == 1 and "layer" in ours[0] and "9" in ours[0], proc.stderr
    assert "exitcode  : 2" in proc.stderr, proc.stderr  # torchrun's report of its workers (it exits 1)
    assert not out.exists()
