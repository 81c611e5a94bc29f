"""--overwrite replaces only what xc itself wrote there, and never an input of the same command.

Each case builds a tree under tmp_path, runs one command with --overwrite and checks that it stops
with one line (exit 2) and that no file or folder under tmp_path changed.
"""

import hashlib
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from xcli import files
from xcli.cli import cli
from xcli.errors import BadInput


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A synthetic store with its truth, a checkpoint trained on it and an export of it, made once."""
    root = tmp_path_factory.mktemp("overwrite")
    store, checkpoint = root / "s.zarr", root / "ck.safetensors"
    run = CliRunner().invoke
    assert run(cli, ["synth", "diff", "--tokens", "2048", "--chunk-rows", "256", "-o", str(store)]).exit_code == 0
    result = run(cli, ["train", str(store), "-o", str(checkpoint), "--steps", "5", "--latents", "16", "--k", "4", "-q"])
    assert result.exit_code == 0, result.stderr
    export = root / "export"
    result = run(cli, ["export", str(checkpoint), "--format", "saelens", "-o", str(export), "-q"])
    assert result.exit_code == 0, result.stderr
    return {"store": store, "truth": root / "s.zarr.truth.safetensors", "checkpoint": checkpoint, "export": export}


def tree(root: Path) -> dict[str, str]:
    """Every path under root: a hash of each file's bytes, a mark for each folder."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def foreign(path: Path) -> Path:
    """A folder xc never wrote, with a file in it."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("mine\n")
    return path


def copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


# Each case: (command, case) -> a function of (tmp_path, made, tiny, corpus_file) returning the argv and a
# fragment the message must hold.
def synth_foreign(t, m, tiny, corpus):
    return ["synth", "diff", "-o", str(foreign(t / "proj"))], "is not an xc store"


def synth_foreign_truth(t, m, tiny, corpus):
    store = copy(m["store"], t / "s.zarr")
    (t / "s.zarr.truth.safetensors").write_text("my notes\n")
    return ["synth", "diff", "-o", str(store)], "is not an xc synth truth file"


def synth_checkpoint(t, m, tiny, corpus):  # an xc output, but not a store
    return ["synth", "diff", "-o", str(copy(m["checkpoint"], t / "ck.safetensors"))], "is not an xc store"


def harvest_args(model, data, out):
    return ["harvest", "-m", str(model), "--layers", "0", "-c", "16", "-d", str(data), "-o", str(out)]


def harvest_foreign(t, m, tiny, corpus):
    return harvest_args(tiny["gpt2"], corpus, foreign(t / "proj")), "is not an xc store"


def harvest_model_folder(t, m, tiny, corpus):
    model = copy(tiny["gpt2"], t / "mymodel")
    return harvest_args(model, corpus, model), "is an input of this command"


def harvest_holds_model(t, m, tiny, corpus):
    model = copy(tiny["gpt2"], t / "models" / "mymodel")
    return harvest_args(model, corpus, t / "models"), "holds an input of this command"


def harvest_holds_corpus(t, m, tiny, corpus):
    data = copy(corpus, t / "proj" / "corpus.txt")
    return harvest_args(tiny["gpt2"], data, t / "proj"), "holds an input of this command"


def harvest_store_holds_corpus(t, m, tiny, corpus):  # an xc store, but the corpus lies inside it
    store = copy(m["store"], t / "s.zarr")
    data = copy(corpus, store / "corpus.txt")
    return harvest_args(tiny["gpt2"], data, store), "holds an input of this command"


def train_args(t, m, out, *extra):
    store = copy(m["store"], t / "s.zarr")
    return ["train", str(store), "-o", str(out), "--steps", "5", "--latents", "16", "--k", "4", *extra]


def train_foreign_file(t, m, tiny, corpus):
    (t / "notes.safetensors").write_text("not a checkpoint\n")
    return train_args(t, m, t / "notes.safetensors"), "is not an xc checkpoint"


def train_foreign_folder(t, m, tiny, corpus):
    return train_args(t, m, foreign(t / "proj")), "is not an xc checkpoint"


def train_store_as_output(t, m, tiny, corpus):
    return train_args(t, m, t / "s.zarr"), "is an input of this command"


def train_holds_store(t, m, tiny, corpus):
    args = train_args(t, m, t / "proj")
    store = copy(t / "s.zarr", t / "proj" / "s.zarr")
    shutil.rmtree(t / "s.zarr")
    args[1] = str(store)
    return args, "holds an input of this command"


def train_foreign_state(t, m, tiny, corpus):
    checkpoint = copy(m["checkpoint"], t / "ck.safetensors")
    foreign(t / "ck.safetensors.state.pt")
    return train_args(t, m, checkpoint), "is not a file xc writes (a folder)"


def train_log_is_store(t, m, tiny, corpus):
    return train_args(t, m, t / "ck.safetensors", "--log", str(t / "s.zarr")), "is an input of this command"


def train_log_foreign(t, m, tiny, corpus):
    args = train_args(t, m, t / "ck.safetensors", "--log", str(foreign(t / "logs")))
    return args, "is not a file xc writes (a folder)"


def export_args(t, m, out, fmt="neuronpedia"):
    checkpoint = copy(m["checkpoint"], t / "ck.safetensors")
    store = t / "s.zarr" if (t / "s.zarr").exists() else copy(m["store"], t / "s.zarr")
    return ["export", str(checkpoint), "--store", str(store), "--format", fmt, "-o", str(out)]


def export_store_as_output(t, m, tiny, corpus):  # the report: the store was gone, the export all zeros
    return export_args(t, m, t / "s.zarr"), "is an input of this command"


def export_foreign(t, m, tiny, corpus):
    return export_args(t, m, foreign(t / "proj")), "is not an xc export folder"


def export_holds_store(t, m, tiny, corpus):
    copy(m["store"], t / "proj" / "s.zarr")
    args = export_args(t, m, t / "proj")
    args[3] = str(t / "proj" / "s.zarr")
    return args, "holds an input of this command"


def export_export_holds_checkpoint(t, m, tiny, corpus):  # an xc export, with the checkpoint put inside it
    out = copy(m["export"], t / "export")
    checkpoint = copy(m["checkpoint"], out / "ck.safetensors")
    return ["export", str(checkpoint), "--format", "saelens", "-o", str(out)], "holds an input of this command"


def export_saelens_foreign(t, m, tiny, corpus):
    return export_args(t, m, foreign(t / "proj"), "saelens"), "is not an xc export folder"


def classify_args(t, m, *extra):
    checkpoint = copy(m["checkpoint"], t / "ck.safetensors")
    return ["classify", str(checkpoint), *extra]


def classify_checkpoint_as_output(t, m, tiny, corpus):
    return classify_args(t, m, "-o", str(t / "ck.safetensors")), "is an input of this command"


def classify_store_as_output(t, m, tiny, corpus):
    store = copy(m["store"], t / "s.zarr")
    return classify_args(t, m, "--store", str(store), "-o", str(store)), "is an input of this command"


def classify_foreign_folder(t, m, tiny, corpus):
    return classify_args(t, m, "-o", str(foreign(t / "proj"))), "is not a file xc writes (a folder)"


def classify_holds_checkpoint(t, m, tiny, corpus):
    checkpoint = copy(m["checkpoint"], t / "proj" / "ck.safetensors")
    return ["classify", str(checkpoint), "-o", str(t / "proj")], "holds an input of this command"


def classify_plot_foreign(t, m, tiny, corpus):
    pytest.importorskip("matplotlib")
    foreign(t / "figs" / "relative_norm.png")
    return classify_args(t, m, "--plot", str(t / "figs")), "is not a file xc writes (a folder)"


def classify_plot_is_checkpoint(t, m, tiny, corpus):
    pytest.importorskip("matplotlib")
    checkpoint = copy(m["checkpoint"], t / "figs" / "relative_norm.png")
    return ["classify", str(checkpoint), "--plot", str(t / "figs")], "is an input of this command"


CASES = [synth_foreign, synth_foreign_truth, synth_checkpoint,
         harvest_foreign, harvest_model_folder, harvest_holds_model, harvest_holds_corpus,
         harvest_store_holds_corpus,
         train_foreign_file, train_foreign_folder, train_store_as_output, train_holds_store, train_foreign_state,
         train_log_is_store, train_log_foreign,
         export_store_as_output, export_foreign, export_holds_store, export_export_holds_checkpoint,
         export_saelens_foreign,
         classify_checkpoint_as_output, classify_store_as_output, classify_foreign_folder,
         classify_holds_checkpoint, classify_plot_foreign, classify_plot_is_checkpoint]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_overwrite_refuses_what_xc_did_not_write_and_its_own_inputs(tmp_path, made, tiny, corpus_file, case):
    args, fragment = case(tmp_path, made, tiny, corpus_file)
    before = tree(tmp_path)
    result = CliRunner().invoke(cli, [*args, "--overwrite"])
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "refusing to replace it with --overwrite" in result.stderr and fragment in result.stderr, result.stderr
    assert tree(tmp_path) == before


def test_overwrite_still_replaces_xc_outputs(tmp_path, made):
    """The real outputs stay replaceable: a store and truth, a checkpoint, an export, a classify file."""
    store = copy(made["store"], tmp_path / "s.zarr")
    copy(made["truth"], tmp_path / "s.zarr.truth.safetensors")
    run = CliRunner().invoke
    result = run(cli, ["synth", "diff", "--tokens", "1024", "--chunk-rows", "256", "-o", str(store), "--overwrite"])
    assert result.exit_code == 0, result.stderr
    checkpoint = copy(made["checkpoint"], tmp_path / "ck.safetensors")
    result = run(cli, ["train", str(store), "-o", str(checkpoint), "--steps", "3", "--latents", "16", "--k", "4",
                       "--overwrite", "--log", str(tmp_path / "log.jsonl")])
    assert result.exit_code == 0, result.stderr
    rows = tmp_path / "rows.jsonl"
    rows.write_text("old\n")
    assert run(cli, ["classify", str(checkpoint), "-o", str(rows), "--overwrite", "-q"]).exit_code == 0
    assert rows.read_text() != "old\n"
    out = copy(made["export"], tmp_path / "export")
    result = run(cli, ["export", str(checkpoint), "--format", "saelens", "-o", str(out), "--overwrite", "-q"])
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize("kind, make, why", [
    ("store", lambda p: p.mkdir(), "no xc metadata"),
    ("store", lambda p: (p.mkdir(), (p / "zarr.json").write_text('{"attributes": {"xc": {"format": "x"}}}')),
     "no xc metadata"),
    ("checkpoint", lambda p: p.write_bytes(b"\x00" * 16), "not a safetensors file"),
    ("checkpoint", lambda p: p.mkdir(), "not a file"),
    ("truth", lambda p: p.write_text("text"), "not a safetensors file"),
    ("export", lambda p: (p.mkdir(), (p / "xc-export.json").write_text('{"format": "other"}')),
     "no xc-export.json manifest"),
    ("file", lambda p: p.mkdir(), "a folder"),
])
def test_check_replaceable_names_the_path_and_why(tmp_path, kind, make, why):
    path = tmp_path / "out"
    make(path)
    with pytest.raises(BadInput, match=why) as e:
        files.check_replaceable(path, kind)
    assert str(path) in str(e.value)
    files.check_replaceable(tmp_path / "missing", kind)  # nothing there: nothing to refuse


@pytest.mark.parametrize("make, fragment", [
    (lambda d, ck: (foreign(d / "relative_norm.png"), [ck])[1], "is not a file xc writes"),
    (lambda d, ck: [shutil.copy(ck, d / "relative_norm.png")], "is an input of this command"),
])
def test_plot_overwrite_refuses_a_folder_or_an_input_under_a_figure_name(tmp_path, made, make, fragment):
    """--plot DIR --overwrite, without matplotlib: the check runs before any figure is drawn."""
    from xcli.analysis import plots

    figs = tmp_path / "figs"
    figs.mkdir()
    inputs = make(figs, made["checkpoint"])
    before = tree(tmp_path)
    with pytest.raises(BadInput, match=fragment):
        plots.check_plot_dir(figs, True, inputs)
    assert tree(tmp_path) == before
    plots.check_plot_dir(tmp_path / "new", True, [made["checkpoint"]])  # a missing folder passes
