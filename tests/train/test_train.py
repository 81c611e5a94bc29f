"""xc train: loss, schedules, loader, resume, failure handling, bad input, and the quality bar."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from safetensors import safe_open

import xcli
from xcli.cli import cli
from xcli.crosscoder import model as crosscoder
from xcli.data import synth
from xcli.data.loader import BatchStream, Position, StoreSet, chunk_order, train_eval_chunks
from xcli.data.store import StoreWriter
from xcli.errors import BadInput
from xcli.source import Source
from xcli.train import loop as tr

ROOT = Path(__file__).resolve().parents[2]
# One thread: tiny matmuls are faster, and in-process and subprocess runs then do identical arithmetic.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def row_store(path, n_rows=1037, chunk_rows=100, names=("a", "b"), tokens=None, complete=True):
    """A store whose rows carry their own index: a[:, 0] = row, b[:, 0] = 2 * row."""
    sources = [Source(n, n, "test", 0, 4 if n == "b" else 3) for n in names]
    writer = StoreWriter(path, sources, chunk_rows=chunk_rows, dtype="float32")
    rows = np.arange(n_rows, dtype=np.float32)
    acts = {}
    for s in sources:  # the values of a source depend on its name only
        values = np.random.default_rng(ord(s.name)).standard_normal((n_rows, s.d)).astype(np.float32)
        values[:, 0] = rows * (2 if s.name == "b" else 1)
        acts[s.name] = values
    writer.append(acts, tokens=np.arange(n_rows) % 7 if tokens is None else tokens)
    if complete:
        writer.close()
    else:
        writer._commit()  # whole chunks committed, as a killed harvest leaves them
    return path


def config(store, out, **overrides):
    base = dict(stores=(str(store),), output=str(out), latents=16, k=2, batch_size=64, steps=60,
                checkpoint_every=10, log_every=5, eval_fraction=0.125, dead_tokens=256, shuffle_buffer=256,
                device="cpu")
    return tr.TrainConfig(**{**base, **overrides})


def weights(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


# -- the loss ------------------------------------------------------------------------------------

def numpy_forward(m, x):
    """The crosscoder written out with numpy: normalised targets, pre-activations, decoders."""
    scale = {s.name: m.scale(s.name).item() for s in m.sources}
    target = {n: x[n].numpy() * scale[n] for n in m.write}
    pre = m.b_enc.detach().numpy() + sum((x[n].numpy() * scale[n]) @ m.encoder_weight(n).detach().numpy()
                                         for n in m.read)
    dec = {n: m.decoder_weight(n).detach().numpy() for n in m.write}
    bias = {n: m.decoder_bias(n).detach().numpy() for n in m.write}
    return target, pre, dec, bias


def random_model(arch, k=None):
    sources = [Source("a", "a", "s", 0, 5), Source("b", "b", "s", 0, 7)]
    torch.manual_seed(0)
    m = crosscoder.Crosscoder(sources, 12, arch, k)
    m.init_weights(torch.Generator().manual_seed(1), decoder_norm=0.6)
    with torch.no_grad():
        m.b_enc.normal_(0, 0.2)
        for b in m.b_dec:
            b.normal_(0, 0.3)
        m.input_scale.copy_(torch.tensor([1.5, 0.7]))
    g = torch.Generator().manual_seed(2)
    return m.train(), {s.name: torch.randn(9, s.d, generator=g) for s in sources}


def test_relu_loss_is_squared_error_summed_over_sources_plus_l1_of_decoder_norms():
    m, x = random_model("relu")
    parts = tr.loss_parts(m, x, l1=0.3, dead=torch.zeros(12, dtype=torch.bool), k_aux=4)
    target, pre, dec, bias = numpy_forward(m, x)
    f = np.maximum(pre, 0)
    sq = {n: ((target[n] - (f @ dec[n] + bias[n])) ** 2).sum() for n in m.write}
    recon = sum(sq.values()) / 9
    norms = np.linalg.norm(dec["a"], axis=1) + np.linalg.norm(dec["b"], axis=1)  # sum of norms, not norm of concat
    sparsity = 0.3 * (f * norms).sum(axis=1).mean()
    assert parts.recon.item() == pytest.approx(recon, rel=1e-5)
    assert parts.sparsity.item() == pytest.approx(sparsity, rel=1e-5)
    assert parts.aux.item() == 0 and parts.loss.item() == pytest.approx(recon + sparsity, rel=1e-5)
    for n in m.write:
        assert parts.sq_err[n].item() == pytest.approx(sq[n], rel=1e-5)
        assert parts.variance[n].item() == pytest.approx(((target[n] - target[n].mean(0)) ** 2).sum(), rel=1e-5)


def test_auxk_loss_reconstructs_the_residual_from_dead_latents_normalised_by_its_variance():
    m, x = random_model("topk", k=3)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[[0, 3, 4, 8, 11]] = True
    parts = tr.loss_parts(m, x, l1=0.0, dead=dead, k_aux=2)
    target, pre, dec, bias = numpy_forward(m, x)
    relu = np.maximum(pre, 0)
    norms = np.linalg.norm(dec["a"], axis=1) + np.linalg.norm(dec["b"], axis=1)
    f = np.zeros_like(relu)
    aux_f = np.zeros_like(relu)
    for t in range(9):
        best = np.argsort(-relu[t] * norms)[:3]
        f[t, best] = relu[t, best]
        dead_best = sorted(np.flatnonzero(dead.numpy()), key=lambda i: -relu[t, i])[:2]
        aux_f[t, dead_best] = relu[t, dead_best]
    residual = {n: target[n] - (f @ dec[n] + bias[n]) for n in m.write}
    err = sum(((residual[n] - aux_f @ dec[n]) ** 2).sum() for n in m.write)
    var = sum(((residual[n] - residual[n].mean(0)) ** 2).sum() for n in m.write)
    recon = sum((r ** 2).sum() for r in residual.values()) / 9
    assert parts.aux.item() == pytest.approx(err / var, rel=1e-4)
    assert parts.loss.item() == pytest.approx(recon + err / var / 32, rel=1e-5)
    # The residual is a fixed target: AuxK moves only the dead latents' decoders and the encoder.
    m.zero_grad()
    parts.aux.backward()
    grad = m.decoder_weight("a").grad
    assert grad[~dead].abs().max() == 0 and grad[dead].abs().max() > 0


# -- schedules -------------------------------------------------------------------------------------

def test_learning_rate_warms_up_stays_flat_then_decays_to_zero():
    cfg = tr.TrainConfig(stores=("x",), output="o", steps=100, warmup=10, lr=1.0, decay=0.2)
    lrs = [tr.lr_at(s, cfg) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80:] == pytest.approx([(100 - s) / 20 for s in range(80, 100)])
    assert lrs[-1] > 0 and tr.lr_at(100, cfg) == 0


def test_l1_warms_up_over_five_percent_and_threshold_decay():
    cfg = tr.TrainConfig(stores=("x",), output="o", arch="relu", steps=200, l1=2.0)
    assert [tr.l1_at(s, cfg) for s in (0, 4, 9, 10, 199)] == pytest.approx([0.2, 1.0, 2.0, 2.0, 2.0])
    assert [tr.threshold_decay(n) for n in (1, 2, 10, 1000, 5000)] == pytest.approx([0, 0.5, 0.9, 0.999, 0.999])


def test_steps_for_tokens_counts_the_partial_batch_of_every_epoch():
    for tokens, rows, batch in [(1000, 300, 64), (300, 300, 64), (301, 300, 64), (64, 300, 64), (900, 300, 100)]:
        steps, seen, left = 0, 0, 0
        while seen < tokens:  # brute force: walk the epochs batch by batch
            left = left or rows
            take = min(batch, left)
            seen, left, steps = seen + take, left - take, steps + 1
        assert tr.steps_for_tokens(tokens, rows, batch) == steps


# -- the loader ------------------------------------------------------------------------------------

def test_loader_covers_every_training_row_once_per_epoch_and_never_the_held_out_chunks(tmp_path):
    stores = StoreSet([row_store(tmp_path / "rows.zarr")])  # 1037 rows: 10 chunks of 100 and one of 37
    train_chunks, held = train_eval_chunks(stores.n_chunks, 0.2)
    assert len(held) == 2 and set(train_chunks) | set(held) == set(range(11))
    held_rows = {r for c in held for r in range(*stores.chunk_range(c))}
    stream = BatchStream(stores, ["a", "b"], train_chunks, batch_size=64, seed=5, shuffle_rows=250)
    expected = set(range(1037)) - held_rows
    assert stream.rows_per_epoch == len(expected)
    batches = stream.batches()
    previous = None
    for epoch in range(3):
        seen, sizes = [], []
        while True:
            batch = next(batches)
            rows = batch.data["a"][:, 0].numpy()
            np.testing.assert_array_equal(batch.data["b"][:, 0].numpy(), 2 * rows)  # sources read together
            seen += rows.astype(int).tolist()
            sizes.append(len(rows))
            if batch.after == Position(epoch + 1, 0):
                break
            assert batch.after == Position(epoch, len(seen))
        assert sorted(seen) == sorted(expected)  # each training row exactly once, no held-out row
        assert sizes[:-1] == [64] * (len(sizes) - 1) and sizes[-1] == len(expected) % 64
        assert seen != sorted(seen)
        assert seen != previous  # a new order each epoch
        previous = seen


def test_loader_restarted_at_a_position_continues_the_same_stream(tmp_path):
    stores = StoreSet([row_store(tmp_path / "rows.zarr", n_rows=900)])
    train_chunks, _ = train_eval_chunks(stores.n_chunks, 0.1)
    stream = BatchStream(stores, ["a"], train_chunks, batch_size=70, seed=1, shuffle_rows=200)
    reference = []
    batches = stream.batches()
    for _ in range(40):  # about three epochs
        batch = next(batches)
        reference.append((batch.data["a"][:, 0].numpy(), batch.after))
    for cut in (0, 3, 11, 12, 13, 25):
        restarted = stream.batches(reference[cut][1])
        for rows, after in reference[cut + 1:cut + 8]:
            batch = next(restarted)
            np.testing.assert_array_equal(batch.data["a"][:, 0].numpy(), rows)
            assert batch.after == after
    with stream.prefetched(reference[5][1]) as prefetched:
        for rows, _ in reference[6:30]:
            np.testing.assert_array_equal(next(prefetched).data["a"][:, 0].numpy(), rows)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_loader_hands_over_rows_as_stored_which_widen_exactly(tmp_path, dtype):
    from xcli.data.store import open_store
    sources = [Source("a", "a", "test", 0, 6)]
    values = np.random.default_rng(0).standard_normal((300, 6)).astype(np.float32)
    writer = StoreWriter(tmp_path / "s.zarr", sources, chunk_rows=100, dtype=dtype)
    writer.append({"a": values}, tokens=np.zeros(300, dtype=np.int64))
    writer.close()
    stores = StoreSet([tmp_path / "s.zarr"])
    stored = open_store(tmp_path / "s.zarr").read("a", 0, 300)  # widened by the store
    batch = next(BatchStream(stores, ["a"], np.arange(3), 300, seed=0, shuffle_rows=300).batches())
    assert batch.data["a"].dtype == getattr(torch, dtype)
    assert sorted(map(tuple, batch.data["a"].float().numpy())) == sorted(map(tuple, stored))


def test_prefetcher_hands_errors_to_the_consumer():
    from xcli.data.loader import Prefetcher

    def broken():
        yield 1
        raise OSError("disk gone")

    with Prefetcher(broken(), 2) as p:
        assert next(p) == 1
        with pytest.raises(OSError, match="disk gone"):
            next(p)


def test_stores_that_line_up_are_read_as_one_table(tmp_path):
    row_store(tmp_path / "one.zarr", names=("a",))
    row_store(tmp_path / "two.zarr", names=("b",))
    stores = StoreSet([tmp_path / "one.zarr", tmp_path / "two.zarr"])
    assert stores.names == ["a", "b"] and stores.n_tokens == 1037
    chunk = stores.read_chunk(3, ["a", "b"])
    np.testing.assert_array_equal(chunk["b"][:, 0], 2 * chunk["a"][:, 0])
    assert stores.identity()[1]["tokens_sha256"] == stores.tokens_sha256


# -- training runs ---------------------------------------------------------------------------------

def test_evaluation_matches_a_numpy_computation(small_store, tmp_path):
    path = tr.train(config(small_store, tmp_path / "x.safetensors", steps=20))
    m = xcli.load(path)
    stores = StoreSet([small_store])
    _, held = train_eval_chunks(stores.n_chunks, 0.125)
    result = tr.held_out_metrics(m, stores, held, 50, torch.device("cpu"), "float32")
    x = {n: np.concatenate([stores.read_chunk(c, ["a", "b"])[n] for c in held]) for n in ("a", "b")}
    with torch.no_grad():
        f = m.encode({n: torch.from_numpy(v) for n, v in x.items()}).numpy()
        recon = {n: v.numpy() for n, v in m.decode(torch.from_numpy(f)).items()}
    for n in ("a", "b"):
        fvu = ((x[n] - recon[n]) ** 2).sum() / ((x[n] - x[n].mean(0)) ** 2).sum()  # raw units: FVU is scale-free
        assert result["fvu"][n] == pytest.approx(fvu, rel=1e-4)
    assert result["l0"] == pytest.approx((f != 0).sum(1).mean())
    assert result["dead_fraction"] == pytest.approx(1 - (f != 0).any(0).mean())
    assert result["tokens"] == len(x["a"]) == 256


def test_checkpoint_holds_the_contract(small_store, tmp_path):
    log = tmp_path / "m.jsonl"
    path = tr.train(config(small_store, tmp_path / "x.safetensors", log=str(log)))
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = json.loads(f.metadata()["xc"])
    assert keys == {"encoder_bias", "threshold", "encoder.a", "encoder.b", "decoder.a", "decoder.b",
                    "decoder_bias.a", "decoder_bias.b", "input_scale.a", "input_scale.b"}
    assert meta["arch"] == "batchtopk" and meta["n_latents"] == 16 and meta["k"] == 2
    assert [s["name"] for s in meta["sources"]] == ["a", "b"] and meta["sources"][0]["d"] == 8
    assert meta["read"] == meta["write"] == ["a", "b"] and meta["xc_version"] == xcli.__version__
    assert meta["hyperparameters"]["batch_size"] == 64 and meta["hyperparameters"]["steps"] == 60
    assert meta["store"][0]["n_tokens"] == 2048 and len(meta["store"][0]["tokens_sha256"]) == 64
    training = meta["training"]
    assert training["complete"] and training["tokens"] == 60 * 64 and training["metrics_from"] == "eval"
    assert set(training["fvu"]) == {"a", "b"} and training["l0"] > 0 and 0 <= training["dead_fraction"] <= 1
    assert meta["conventions"]["sparsity_penalty"].startswith("l1 * sum_i f_i * sum_s")
    assert not tr.state_path(path).exists()
    # Input scales make each source's mean squared norm its width.
    stores = StoreSet([small_store])
    for name in ("a", "b"):
        scale = float(weights(path)[f"input_scale.{name}"])
        assert scale ** 2 * stores.stats(name)["mean_sq_norm"] == pytest.approx(8, rel=1e-5)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(5, 61, 5))
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10, 20, 30, 40, 50, 60]
    first = records[0]
    for key in ("tokens", "loss", "recon", "aux", "fvu", "fvu_total", "l0", "dead_fraction", "lr", "tokens_per_s",
                "threshold"):
        assert key in first


def test_one_store_of_two_sources_equals_two_stores_of_one(tmp_path):
    both = row_store(tmp_path / "both.zarr", n_rows=640, chunk_rows=64)
    a, b = (row_store(tmp_path / f"{n}.zarr", n_rows=640, chunk_rows=64, names=(n,)) for n in "ab")
    one = tr.train(config(both, tmp_path / "one.safetensors", steps=15, latents=8))
    two = tr.train(config(a, tmp_path / "two.safetensors", steps=15, latents=8, stores=(str(a), str(b))))
    assert_same_weights(one, two)
    assert [s["sources"] for s in xcli.load(two).metadata["store"]] == [["a"], ["b"]]


def test_transcoder_reads_one_source_and_writes_another(small_store, tmp_path):
    path = tr.train(config(small_store, tmp_path / "t.safetensors", read=("a",), write=("b",), steps=10,
                           arch="topk"))
    m = xcli.load(path)
    assert m.read == ["a"] and m.write == ["b"]
    assert {"encoder.a", "decoder.b"} <= weights(path).keys() and "encoder.b" not in weights(path)
    out = m.decode(m.encode({"a": torch.randn(3, 8)}))
    assert list(out) == ["b"]


def test_relu_run_logs_the_l1_warmup(small_store, tmp_path):
    seen = []
    tr.train(config(small_store, tmp_path / "r.safetensors", arch="relu", k=None, l1=0.5, steps=40),
             on_log=seen.append)
    l1 = [r["l1"] for r in seen if r["kind"] == "train"]
    assert l1[0] == pytest.approx(0.5) and all(v == pytest.approx(0.5) for v in l1)  # 5% of 40 steps = 2
    assert all(r["sparsity"] > 0 for r in seen if r["kind"] == "train")


# -- resume, kill -9, NaN ----------------------------------------------------------------------------

class Crash(Exception):
    pass


def crash_at(step):
    def on_log(record):
        if record["kind"] == "train" and record["step"] == step:
            raise Crash

    return on_log


def interrupt_at(step):
    def on_log(record):
        if record["kind"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    return on_log


def test_resume_ends_with_exactly_the_weights_of_an_uninterrupted_run(small_store, tmp_path):
    reference = tr.train(config(small_store, tmp_path / "ref.safetensors", log=str(tmp_path / "ref.jsonl")))
    out, log = tmp_path / "x.safetensors", tmp_path / "x.jsonl"
    with pytest.raises(Crash):
        tr.train(config(small_store, out, log=str(log)), on_log=crash_at(35))
    assert tr.state_path(out).exists()
    assert json.loads(safe_open(str(out), "pt").metadata()["xc"])["training"]["step"] == 30
    with pytest.raises(BadInput, match="interrupted run"):  # a plain rerun refuses to start over silently
        tr.train(config(small_store, out, log=str(log)))
    with pytest.raises(BadInput, match="--lr"):  # a resume with other settings is refused
        tr.train(config(small_store, out, log=str(log), resume=True, lr=0.5))
    # Ctrl-C (SIGINT) mid-run: the run saves at the next step boundary, then stops.
    with pytest.raises(KeyboardInterrupt):
        tr.train(config(small_store, out, log=str(log), resume=True), on_log=interrupt_at(45))
    assert torch.load(tr.state_path(out), weights_only=True)["step"] == 45
    tr.train(config(small_store, out, log=str(log), resume=True))
    assert_same_weights(out, reference)
    assert not tr.state_path(out).exists()
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    reference_steps = [json.loads(line)["step"] for line in (tmp_path / "ref.jsonl").read_text().splitlines()]
    assert steps == reference_steps  # the log was cut back to the checkpoint: no duplicated lines
    # Resuming a finished run does nothing and succeeds.
    before = out.stat().st_mtime_ns
    assert tr.train(config(small_store, out, log=str(log), resume=True)) == out
    assert out.stat().st_mtime_ns == before


CLI_RUN = ["--latents", "16", "--k", "2", "--batch-size", "64", "--steps", "200", "--checkpoint-every", "10",
           "--log-every", "5", "--eval-fraction", "0.125", "--dead-tokens", "256", "--shuffle-buffer", "256",
           "--device", "cpu"]


def saved_step(out) -> int:
    try:
        return torch.load(tr.state_path(out), weights_only=True)["step"]
    except Exception:  # not written yet, or replaced while we read it
        return -1


def test_kill_9_then_resume_gives_the_uninterrupted_weights(small_store, tmp_path):
    reference = tr.train(config(small_store, tmp_path / "ref.safetensors", steps=200, checkpoint_every=10))
    out = tmp_path / "x.safetensors"
    command = [sys.executable, "-m", "xcli", "train", str(small_store), "-o", str(out), *CLI_RUN]
    proc = subprocess.Popen(command, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while saved_step(out) < 0 or not out.exists():  # kill -9 as soon as the first checkpoint is on disk
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = saved_step(out)
    assert 0 < killed_at < 200 and not xcli.load(out).metadata["training"]["complete"]
    proc = subprocess.run([*command, "--resume"], env=SUBPROCESS_ENV, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{out}\n"
    assert_same_weights(out, reference)


def test_nan_in_the_data_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    store = tmp_path / "nan.zarr"
    synth.make_store(store, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    # Poison one row of the last chunk epoch 0 reads (the statistics stay finite, as after a bad disk).
    train_chunks, _ = train_eval_chunks(16, 0.125)
    last = int(chunk_order(train_chunks, 0, 0)[-1])
    group = zarr.open_group(str(store), mode="r+")
    group["acts/a"][last * 128 + 5, 0] = np.nan
    out = tmp_path / "x.safetensors"
    args = ["train", str(store), "-o", str(out), "--latents", "16", "--k", "2", "--batch-size", "64",
            "--steps", "60", "--checkpoint-every", "5", "--eval-fraction", "0.125", "--shuffle-buffer", "128",
            "--device", "cpu"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.stdout == ""
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "nan" in message and "last good checkpoint (step 25)" in message
    meta = xcli.load(out).metadata["training"]
    assert meta["step"] == 25 and not meta["complete"]
    assert all(torch.isfinite(t).all() for t in weights(out).values())


@pytest.mark.parametrize("lr,stopped_by", [("1e39", ("the weights became non-finite",)),
                                           ("1e38", ("the weights became non-finite", "the loss is"))])
def test_weights_that_become_non_finite_are_never_checkpointed(small_store, tmp_path, lr, stopped_by):
    """An optimizer step so large that the weights overflow (1e39 > float32's max) though loss and gradients
    were finite: the run stops before writing anything. 1e38 may leave finite (huge) weights, and then
    the next step's loss stops it. Either way every checkpoint on disk holds finite weights."""
    out = tmp_path / "x.safetensors"
    args = ["train", str(small_store), "-o", str(out), "--latents", "16", "--k", "2", "--batch-size", "64",
            "--steps", "20", "--checkpoint-every", "1", "--lr", lr, "--clip", "0", "--warmup", "0",
            "--device", "cpu", "--dtype", "float32"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and result.stdout == ""
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("xc: error: ") and any(text in message for text in stopped_by)
    if out.exists():
        assert all(torch.isfinite(t).all() for t in weights(out).values())
        state = torch.load(tr.state_path(out), weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values())
    else:
        assert "no checkpoint had been written yet" in message


def test_log_and_checkpoint_must_be_different_files(small_store, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(small_store), "-o", str(out), "--log", str(out)])
    assert result.exit_code == 2 and "--log" in result.stderr and "is the checkpoint -o names" in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("option,value", [("--lr", "inf"), ("--lr", "nan"), ("--clip", "nan"), ("--l1", "inf")])
def test_non_finite_options_are_refused(small_store, tmp_path, option, value):
    arch = ["--arch", "relu"] if option == "--l1" else []
    result = CliRunner().invoke(cli, ["train", str(small_store), "-o", str(tmp_path / "x.safetensors"),
                                      option, value, *arch])
    assert result.exit_code == 2 and f"'{option}': '{value}' is not a finite number" in result.stderr


def test_a_diverging_run_is_warned_about(small_store, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(small_store), "-o", str(out), "--latents", "16", "--k", "2",
                                      "--batch-size", "64", "--steps", "20", "--lr", "30", "--clip", "0",
                                      "--warmup", "0", "--device", "cpu", "--dtype", "float32"])
    assert result.exit_code == 0 and result.stdout == f"{out}\n"
    fvu = xcli.load(out).metadata["training"]["fvu_total"]
    assert fvu > 100  # seen: about 1e4
    assert result.stderr.count("may be diverging") == 1 and f"held-out FVU is {fvu:.4g}" in result.stderr



@pytest.mark.parametrize("fvus, warned_at", [((3.0, 1.5, 0.4), None),  # a wide start above 1 that falls: no alarm
                                             ((1.2, 1.6, 2.0), 20),  # rising above 1: warned once, when it rises
                                             ((0.6, 0.5, 1.3), 30),  # rising past 1
                                             ((1.9, 1.4, 1.1), 30)])  # the finished run worse than the mean
def test_the_divergence_warning_follows_the_held_out_fvu(small_store, tmp_path, monkeypatch, fvus, warned_at):
    seen = iter(fvus)
    monkeypatch.setattr(tr, "held_out_metrics", lambda *a, **kw: {"fvu_total": next(seen), "tokens": 1})
    warnings = []
    monkeypatch.setattr(tr.console, "warn", warnings.append)
    tr.train(config(small_store, tmp_path / "x.safetensors", steps=30, checkpoint_every=10))
    alarms = [w for w in warnings if "may be diverging" in w]
    assert len(alarms) == (warned_at is not None)
    if warned_at:
        assert f"at step {warned_at}:" in alarms[0]


# -- the command line ------------------------------------------------------------------------------------

def test_cli_reads_the_store_from_stdin_and_prints_only_the_path(small_store, tmp_path):
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", "-", "-o", str(out), "--latents", "16", "--k", "2",
                                      "--batch-size", "64", "--tokens", "1K", "--device", "cpu"],
                                input=f"{small_store}\n")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"{out}\n"
    assert xcli.load(out).metadata["training"]["tokens"] == 1024


@pytest.fixture(scope="module")
def odd_stores(tmp_path_factory):
    """Stores that do not fit together or are unfinished."""
    path = tmp_path_factory.mktemp("odd")
    row_store(path / "short.zarr", n_rows=1000, names=("c",))
    row_store(path / "long.zarr", n_rows=1037, names=("d",))
    row_store(path / "other_tokens.zarr", n_rows=1037, names=("e",), tokens=np.arange(1037) % 5)
    row_store(path / "partial.zarr", n_rows=1037, names=("f",), complete=False)
    return path


def bad_input_cases(tmp_path, small_store, odd):
    (tmp_path / "exists.safetensors").write_text("x")
    s = str(small_store)
    long = str(odd / "long.zarr")
    return {
        "unknown source": ([s, "--sources", "a,nope"], "unknown source 'nope'"),
        "read names nothing": ([s, "--read", ""], "--read names no source"),
        "write names nothing": ([s, "--write", " , "], "--write names no source"),
        "read outside sources": ([s, "--sources", "a", "--read", "b"], "--read names unknown source 'b'"),
        "k not below F": ([s, "--latents", "8", "--k", "8"], "--k 8 must be below the number of latents (8)"),
        "rows do not line up": ([long, str(odd / "short.zarr")], "do not line up"),
        "tokens do not line up": ([long, str(odd / "other_tokens.zarr")], "different tokens"),
        "same source twice": ([s, s], "source names must be unique"),
        "incomplete store": ([str(odd / "partial.zarr")], "--allow-incomplete"),
        "missing store": ([str(tmp_path / "none.zarr")], "does not exist"),
        "latents and expansion": ([s, "--latents", "8", "--expansion", "2"], "give one of them"),
        "tokens and steps": ([s, "--tokens", "100", "--steps", "3"], "give one of them"),
        "k with relu": ([s, "--arch", "relu", "--k", "3"], "--k applies to"),
        "bad count": ([s, "--tokens", "lots"], "not a count"),
        "eval takes all": ([s, "--eval-fraction", "0.97"], "leaving none to train on"),
        "negative lr": ([s, "--lr", "-1"], "--lr -1.0 must be positive"),
        "output exists": ([s, "-o", str(tmp_path / "exists.safetensors")], "--overwrite"),
        "resume and overwrite": ([s, "--resume", "--overwrite"], "give one of them"),
        "no such device": ([s, "--device", "tpu"], "--device"),
        "cuda missing": ([s, "--device", "cuda"], "no CUDA device"),
    }


@pytest.mark.parametrize("case", [
    "unknown source", "read names nothing", "write names nothing", "read outside sources", "k not below F",
    "rows do not line up", "tokens do not line up", "same source twice", "incomplete store", "missing store",
    "latents and expansion", "tokens and steps", "k with relu", "bad count", "eval takes all", "negative lr",
    "output exists", "resume and overwrite", "no such device", "cuda missing"])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(case, tmp_path, small_store, odd_stores):
    if case == "cuda missing" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    args, message = bad_input_cases(tmp_path, small_store, odd_stores)[case]
    if "-o" not in args:
        args = [*args, "-o", str(tmp_path / "out.safetensors")]
    listing = lambda: sorted(str(p) for folder in (tmp_path, odd_stores, small_store.parent)  # noqa: E731
                             for p in folder.rglob("*"))
    before = listing()
    result = CliRunner().invoke(cli, ["train", *args, "--batch-size", "64", "--log", str(tmp_path / "m.jsonl")])
    assert result.exit_code == 2, result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert listing() == before


def test_allow_incomplete_trains_on_the_committed_rows(tmp_path):
    store = row_store(tmp_path / "partial.zarr", n_rows=1037, complete=False)
    out = tr.train(config(store, tmp_path / "x.safetensors", allow_incomplete=True, steps=5, latents=8))
    meta = xcli.load(out).metadata
    assert meta["store"][0]["n_tokens"] == 1000 and not meta["store"][0]["complete"]


# -- the quality bar -----------------------------------------------------------------------------------

def test_recovers_planted_shared_and_exclusive_features(tmp_path):
    """Two sources, 12 shared and 6 + 6 exclusive features (18 per 16-dim source: superposition),
    3 active per token. BatchTopK with k = 3 must find >= 95% of them (decoder cosine > 0.9), and
    decoder-norm shares must tell shared from exclusive features."""
    store = tmp_path / "planted.zarr"
    truth = synth.make_store(store, n_tokens=65536, d=16, n_shared=12, n_exclusive=6, active=3.0,
                             chunk_rows=1024, seed=3)
    assert synth.PlantedDictionary.load(synth.truth_path(store)).kinds == truth.kinds
    path = tr.train(tr.TrainConfig(stores=(str(store),), output=str(tmp_path / "x.safetensors"), latents=64, k=3,
                                   batch_size=256, tokens=3 * 65536, eval_fraction=0.05, dead_tokens=5000,
                                   shuffle_buffer=4096, checkpoint_every=10_000, device="cpu"))
    m = xcli.load(path)
    result = synth.match(truth, m)
    assert result.recovered(0.9) >= 0.95
    share_a = result.share[:, 0]  # share of the latent's decoder norm in source a
    kinds = np.array(truth.kinds)
    assert ((share_a > 0.3) & (share_a < 0.7))[kinds == "shared"].all()
    assert (share_a > 0.9)[kinds == "exclusive:a"].all()
    assert (share_a < 0.1)[kinds == "exclusive:b"].all()
    training = m.metadata["training"]
    assert training["fvu_total"] < 0.05
    # The BatchTopK threshold, calibrated on the held-out rows, gives about k latents per token on others.
    stores = StoreSet([store])
    train_chunks, _ = train_eval_chunks(stores.n_chunks, 0.05)
    rows = [stores.read_chunk(c, ["a", "b"]) for c in train_chunks[:8]]
    with torch.no_grad():
        codes = m.encode({n: torch.from_numpy(np.concatenate([r[n] for r in rows])) for n in ("a", "b")})
    assert abs(float((codes > 0).sum(1).float().mean()) - 3) < 0.5


def numpy_threshold(m, x) -> float:
    """Midway between the k·N-th and (k·N+1)-th largest selection scores of the N rows `x`, in numpy."""
    _, pre, dec, _ = numpy_forward(m, x)
    score = np.maximum(pre, 0) * sum(np.linalg.norm(dec[n], axis=1) for n in dec)
    return np.sort(score.ravel())[-(m.k * len(score) + 1):][:2].mean()


@pytest.mark.parametrize("eval_fraction", [0.125, 0.0])
def test_batchtopk_threshold_is_calibrated_on_held_out_rows(small_store, tmp_path, eval_fraction):
    """The saved threshold lies midway between the k·N-th and (k·N+1)-th largest selection scores over the
    held-out rows, written out with numpy: rows the model never trained on, as at inference. With nothing
    held out: the training rows."""
    path = tr.train(config(small_store, tmp_path / "t.safetensors", steps=30, eval_fraction=eval_fraction))
    m = xcli.load(path)
    stores = StoreSet([small_store])
    train_chunks, held = stores.hold_out(eval_fraction)
    chunks = held if eval_fraction else train_chunks
    rows = [stores.read_chunk(c, ["a", "b"]) for c in chunks]
    x = {n: torch.from_numpy(np.concatenate([r[n] for r in rows])) for n in ("a", "b")}
    assert float(m.threshold) == pytest.approx(numpy_threshold(m, x), rel=1e-5)
    if eval_fraction:  # held-out rows: not the rows the threshold of the first training chunks gives
        train_x = {n: torch.from_numpy(stores.read_chunk(train_chunks[0], ["a", "b"])[n]) for n in ("a", "b")}
        assert float(m.threshold) != pytest.approx(numpy_threshold(m, train_x), rel=1e-5)


def test_bfloat16_compute_keeps_float32_weights(small_store, tmp_path):
    path = tr.train(config(small_store, tmp_path / "bf.safetensors", dtype="bfloat16", steps=10))
    assert all(t.dtype == torch.float32 for t in weights(path).values())
    assert math.isfinite(xcli.load(path).metadata["training"]["fvu_total"])


def test_a_store_of_one_chunk_trains_with_the_defaults_and_holds_out_rows(tmp_path):
    """A 3,000-token store is one chunk: held-out rows come in blocks, the same for train and xc eval."""
    from xcli.analysis.evaluate import eval_rows
    from xcli.data.loader import MIN_BLOCK_ROWS, StoreSet

    store = tmp_path / "one.zarr"
    synth.make_store(store, n_tokens=3000, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=4096, seed=1)
    out = tmp_path / "x.safetensors"
    result = CliRunner().invoke(cli, ["train", str(store), "-o", str(out), "--steps", "20", "--latents", "16",
                                      "--k", "2", "--batch-size", "64", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    training = xcli.load(out).metadata["training"]
    assert training["metrics_from"] == "eval" and 0 < training["eval_tokens"] <= 0.05 * 3000
    stores = StoreSet([store])
    train_blocks, held = stores.hold_out(0.01)
    assert stores.chunk_rows >= MIN_BLOCK_ROWS and stores.n_chunks >= 2
    rows = {r for c in held for r in range(*stores.chunk_range(c))}
    trained = {r for c in train_blocks for r in range(*stores.chunk_range(c))}
    assert rows and not rows & trained and len(rows | trained) == 3000
    evaluated, kind = eval_rows(xcli.load(out), StoreSet([store]), all_rows=False)
    assert kind == "held-out" and list(evaluated) == list(held)


def test_dead_window_and_k_aux_defaults_scale_with_the_run(small_store, tmp_path):
    stores = StoreSet([small_store])  # two sources of width 8
    short = tr.resolve(config(small_store, tmp_path / "x.safetensors", dead_tokens=None, steps=50), stores)
    assert short.dead_tokens == 50 * 64 // 10  # a tenth of the run
    assert short.k_aux == 8  # half the summed width of the written sources
    long = tr.resolve(config(small_store, tmp_path / "x.safetensors", dead_tokens=None, steps=10**7), stores)
    assert long.dead_tokens == 10_000_000  # at most 10M tokens
    given = tr.resolve(config(small_store, tmp_path / "x.safetensors", dead_tokens=123, k_aux=3), stores)
    assert (given.dead_tokens, given.k_aux) == (123, 3)


def test_k_aux_default_is_at_most_512(tmp_path):
    wide = synth.generate(synth.load_spec(None, models=("a", "b", "c"), width=400, shared=8, exclusive=0,
                                          tokens=256), tmp_path / "wide.zarr", chunk_rows=128)
    assert wide.n_features == 8
    stores = StoreSet([tmp_path / "wide.zarr"])
    assert tr.resolve(config(tmp_path / "wide.zarr", tmp_path / "x.safetensors"), stores).k_aux == 512


def test_init_gives_each_latent_a_unit_norm_decoder_and_the_encoder_its_transpose(small_store):
    stores = StoreSet([small_store])
    m = crosscoder.Crosscoder(stores.sources, 16, "batchtopk", 2)
    m.init_weights(torch.Generator().manual_seed(0))
    norms = m.decoder_norms()  # (F, sources)
    torch.testing.assert_close(norms, torch.full_like(norms, 2 ** -0.5))
    for s in stores.sources:
        torch.testing.assert_close(m.encoder_weight(s.name), m.decoder_weight(s.name).T)
