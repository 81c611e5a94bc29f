"""The examples run end to end: the quick start finds the planted difference; the cron diff is safe to repeat."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def example_env(**extra) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def test_quickstart_finds_the_planted_difference(tmp_path):
    work = tmp_path / "quickstart"
    run = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh")], capture_output=True, text=True,
                         env=example_env(XC_QUICKSTART_DIR=str(work), XC_QUICKSTART_SIZE="small"))
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads((work / "findings.json").read_text())

    # The latent whose decoder changed most between the models fires on the trigger (or right
    # after it), and its tuned decoder is far from its base decoder.
    changed = found["most_changed"][0]
    assert found["most_changed_on_trigger"], found["most_changed"]
    assert changed["top_examples"] >= 10 and changed["on_trigger"] + changed["after_trigger"] >= 8
    # k = 3 may share "wizard" among two or three latents, each changed less than one alone would be
    # (seen: 0.60 to 0.89 over seeds and sizes, docs/quickstart.md).
    assert changed["change"] >= 0.5 and changed["class"] in ("shared", "mixed", "exclusive:tuned")
    # Exclusive latents, when the crosscoder made one for the planted feature, sit there too.
    for latent in found["exclusive_tuned"]:
        if latent["frequency"] >= 0.005:
            assert latent["on_trigger"] + latent["after_trigger"] >= 8, latent
    # Most latents are shared by both models, with nearly equal decoders: the grammar both learnt.
    classes = found["classes"]
    assert classes["shared"] > sum(v for k, v in classes.items() if k.startswith(("exclusive", "mixed")))
    assert all(x["cosine"] > 0.8 for x in found["shared"][:5]), found["shared"][:5]

    # The planted phrase: never from the base model (alpha -1), sometimes from the tuned one,
    # more often the more the difference is amplified.
    rate = {r["alpha"]: r for r in found["rates"]}
    assert sorted(rate) == [-1, 0, 1, 2, 4]
    assert rate[-1]["matches"] == 0
    assert 0 < rate[0]["rate"] < rate[1]["rate"] <= rate[2]["rate"] <= rate[4]["rate"]
    assert rate[0]["ci95"][1] < rate[4]["ci95"][0]  # the rise is not sampling noise

    assert len(found["export_check"]["sources"]) == 2 and found["export_check"]["features"] == 48
    assert found["eval"]["fvu_total"] < 0.1
    if importlib.util.find_spec("matplotlib"):  # the [plot] extra
        assert (work / "plots" / "relative_norm.png").stat().st_size > 0
    assert "the planted difference was found" in run.stdout
    # The second run (--shared-latents 20 --exclusive tuned=4) gives the planted behaviour a latent of its
    # own: dedicated to the tuned model, firing on the trigger.
    assert found["dedicated_on_trigger"], found["dedicated_tuned"]
    assert "the planted difference was found as a tuned-exclusive latent" in run.stdout

    # A second run reuses the model pair: tiny_pair.py finds its pair.json and writes nothing.
    stamp = (work / "pair" / "tuned" / "model.safetensors").stat().st_mtime_ns
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "tiny_pair.py"), str(work / "pair"),
                            "--size", "small"], capture_output=True, text=True, env=example_env())
    assert again.returncode == 0 and again.stdout.strip() == str(work / "pair")
    assert (work / "pair" / "tuned" / "model.safetensors").stat().st_mtime_ns == stamp


# --- cron_diff.sh --------------------------------------------------------------------------------

CRON = ROOT / "examples" / "cron_diff.sh"


def cron(run_dir, corpus, *args, xc=f"{sys.executable} -m xcli", wait=True):
    command = ["bash", str(CRON), "--data", str(corpus), "--layers", "1", "--context-length", "32", "--chunk-rows", "256",
               "--latents", "64", "--k", "4", "--train-tokens", "100k", "--batch-size", "256",
               "--min-age", "0", "--device", "cpu", *map(str, args), str(run_dir)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=example_env(XC=xc))
    if wait:
        proc.wait()
    return proc


def log_lines(run_dir) -> list[dict]:
    path = Path(run_dir) / ".xc-diff" / "diff.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def grow_positions(source: Path, target: Path, factor: float = 20.0) -> None:
    """The same model with position embeddings `factor` times larger.

    Its residual stream is dominated by positions: once each model's activations are scaled
    to the same mean norm, its token features weigh next to nothing, and a crosscoder trained
    with the original gives those features latents exclusive to the original.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.transformer.wpe.weight.mul_(factor)
    model.save_pretrained(target)
    for name in source.iterdir():
        if "token" in name.name or name.name == "vocab.json":
            shutil.copy(name, target / name.name)


@pytest.fixture
def run_dir(tmp_path, tiny):
    """A training run with two checkpoints; token features stand out in the newer one only."""
    run = tmp_path / "run"
    grow_positions(tiny["gpt2"], run / "checkpoint-900")
    shutil.copytree(tiny["gpt2"], run / "checkpoint-1000")  # version order: 900 < 1000
    return run


def test_cron_diff_locks_alerts_and_does_no_work_twice(run_dir, corpus_file):
    first = cron(run_dir, corpus_file, "--threshold", 0, wait=False)
    lock_taken = run_dir / ".xc-diff" / "pairs"
    while not lock_taken.exists() and first.poll() is None:
        time.sleep(0.05)
    second = cron(run_dir, corpus_file, "--threshold", 0)  # the first holds the lock
    assert second.returncode == 0 and first.poll() is None, second.stderr
    first_err = first.communicate()[1]
    # Random models share nothing: latents exclusive to the new checkpoint exceed 0, so exit 3.
    assert first.returncode == 3, first_err
    assert "exclusive to checkpoint-1000" in first_err
    [line] = log_lines(run_dir)
    assert line["before"].endswith("checkpoint-900") and line["after"].endswith("checkpoint-1000")
    assert line["exclusive_after"] > 0 and line["alert"] is True
    classes = [json.loads(r)["class"] for r in Path(line["classes"]).read_text().splitlines()]
    assert classes.count("exclusive:checkpoint-1000") == line["exclusive_after"]
    assert not list(run_dir.glob(".xc-diff/pairs/*/acts.zarr"))  # the store is dropped once classified

    # Nothing new: no work at all (an xc that always fails is never called) and no new log line.
    idle = cron(run_dir, corpus_file, "--threshold", 0, xc="false")
    assert idle.returncode == 0, idle.stderr.read()
    assert len(log_lines(run_dir)) == 1

    # A newer checkpoint: the pair (1000, 1001) is diffed; below the threshold, exit 0.
    shutil.copytree(run_dir / "checkpoint-1000", run_dir / "checkpoint-1001")
    newer = cron(run_dir, corpus_file, "--threshold", 1000)
    assert newer.returncode == 0, newer.stderr.read()
    lines = log_lines(run_dir)
    assert len(lines) == 2 and lines[1]["after"].endswith("checkpoint-1001") and lines[1]["alert"] is False

    # Killed after the log line was appended but before the pair was marked done: the rerun redoes the
    # pair and appends no second line.
    Path(lines[1]["crosscoder"]).with_name("summary.json").unlink()
    redo = cron(run_dir, corpus_file, "--threshold", 1000)
    assert redo.returncode == 0, redo.stderr.read()
    assert log_lines(run_dir) == lines  # the log is as it was
    assert Path(lines[1]["crosscoder"]).with_name("summary.json").exists()


def test_cron_diff_bad_usage_and_nothing_to_do(tmp_path, corpus_file, tiny):
    run = tmp_path / "run"
    run.mkdir()
    missing = subprocess.run(["bash", str(CRON), "--layers", "1", str(run)], capture_output=True, text=True)
    assert missing.returncode == 2 and "--data is required" in missing.stderr
    bad = subprocess.run(["bash", str(CRON), "--data", str(corpus_file), "--layers", "1", "--threshold", "x",
                          str(run)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--threshold" in bad.stderr
    # One checkpoint only, or a second one still being written (newer than --min-age): nothing to do.
    shutil.copytree(tiny["gpt2"], run / "step-1")
    shutil.copytree(tiny["gpt2_b"], run / "step-2")
    fresh = subprocess.run(["bash", str(CRON), "--data", str(corpus_file), "--layers", "1", "--min-age", "3600",
                            str(run)], capture_output=True, text=True, env=example_env(XC="false"))
    assert fresh.returncode == 0 and fresh.stderr == "", fresh.stderr


def test_cron_diff_tracks_features_and_alerts_on_a_watched_one(tmp_path):
    """The planted chain of three tiny language models (tests/tiny_models.py) as the checkpoints of a run:
    the behaviour step-2 adds is one new feature; named, it is gone at step-3: exit 4, one line saying so."""
    import sqlite3

    from tiny_models import RELEASE_LAYER, build_release_chain, release_corpus
    from xcli.track.chain import name_feature
    from xcli.track.config import TrackNameConfig

    chain = build_release_chain(tmp_path / "models", seed=0)
    run = tmp_path / "run"
    shutil.copytree(chain.v1, run / "step-1")
    shutil.copytree(chain.v2, run / "step-2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(release_corpus(150, seed=0)) + "\n")
    registry = tmp_path / "features.db"
    # The settings of tests/track/test_release_chain.py.
    options = ("--threshold", 1000, "--registry", registry, "--layers", RELEASE_LAYER, "--context-length", 64,
               "--chunk-rows", 1024, "--latents", 48, "--k", 2, "--train-tokens", "300k", "--batch-size", 512,
               "--train-options", "--arch topk --lr 3e-3")
    first = cron(run, corpus, *options)
    assert first.returncode == 0, first.stderr.read()
    assert list(run.glob(".xc-diff/pairs/*/acts.zarr"))  # kept to match the next pair through

    def xc_json(*args):
        done = subprocess.run([sys.executable, "-m", "xcli", "track", *map(str, args)], capture_output=True,
                              text=True, env=example_env(), check=False)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    [new] = xc_json("show", registry, "--release", "step-2", "--status", "new")
    assert new["class"] == "exclusive:step-2"
    name_feature(TrackNameConfig(str(registry), "habit", feature=new["feature"]))

    shutil.copytree(chain.v3, run / "step-3")
    alert = cron(run, corpus, *options)
    err = alert.stderr.read()
    assert alert.returncode == 4, err
    assert [line for line in err.splitlines() if "watched feature" in line] == \
        [f"xc: error: watched feature 'habit' (id {new['feature']}) is gone in release 'step-3'"], err
    [last] = [json.loads(line) for line in (run / ".xc-diff" / "diff.log").read_text().splitlines()][-1:]
    assert last["watch_alert"] is True and last["after"].endswith("step-3")

    # Nothing new: no work and nothing added to the registry.
    def counts():
        with sqlite3.connect(registry) as con:
            return [con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("crosscoders", "observations")]
    before = counts()
    idle = cron(run, corpus, *options, xc="false")
    assert idle.returncode == 0, idle.stderr.read()
    assert counts() == before and before[0] == 2
