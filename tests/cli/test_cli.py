"""The conventions every command follows: exit codes, one-line errors, stdout for results."""

import subprocess
import sys

import click
import numpy as np
import pytest
from click.testing import CliRunner

from xcli import console, files
from xcli.cli import cli
from xcli.cli.params import common_options
from xcli.errors import BadInput, XcError

SUBCOMMANDS = ["harvest", "train", "classify", "amplify", "export"]


def run(args, **kwargs):
    return CliRunner().invoke(cli, args, **kwargs)


def test_help_lists_the_five_subcommands():
    result = run(["--help"])
    assert result.exit_code == 0
    for sub in SUBCOMMANDS:
        assert f"  {sub} " in result.stdout


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_each_subcommand_has_help(sub):
    result = run([sub, "--help"])
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: xc {sub}")


def test_version():
    from xcli import __version__

    result = run(["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_bad_option_is_one_line_exit_2_no_traceback():
    result = run(["--no-such-option"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "--no-such-option" in lines[0] and "Traceback" not in result.stderr


def test_unknown_command_exit_2():
    result = run(["frobnicate"])
    assert result.exit_code == 2 and "frobnicate" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# A throwaway group wired like `xc`, to test the error translation in isolation.
@click.group(cls=type(cli))
def demo():
    pass


@demo.command()
@common_options
@click.argument("kind")
def boom(kind):
    if kind == "bad":
        raise BadInput("value 'x' for --thing is not valid; use one of a, b")
    if kind == "runtime":
        raise XcError("the disk is full")
    if kind == "interrupt":
        raise KeyboardInterrupt
    if kind == "bug":
        raise ValueError("unexpected")
    console.info("working")
    console.warn("careful")
    click.echo("/path/to/result")


@pytest.mark.parametrize("kind,code", [("bad", 2), ("runtime", 1), ("interrupt", 130), ("bug", 1), ("ok", 0)])
def test_exit_codes(kind, code):
    result = CliRunner().invoke(demo, ["boom", kind])
    assert result.exit_code == code
    assert "Traceback" not in result.stderr
    if code:
        assert result.stdout == ""
        assert len(result.stderr.strip().splitlines()) == 1


def test_debug_shows_traceback():
    result = CliRunner().invoke(demo, ["boom", "bug", "--debug"])
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_results_on_stdout_and_logs_only_on_a_terminal():
    # CliRunner's stderr is not a terminal: info is hidden, warnings are shown.
    result = CliRunner().invoke(demo, ["boom", "ok"])
    assert result.stdout == "/path/to/result\n"
    assert "working" not in result.stderr and "careful" in result.stderr
    result = CliRunner().invoke(demo, ["boom", "ok", "--quiet"])
    assert result.stdout == "/path/to/result\n" and result.stderr == ""


def test_installed_entry_point_runs_as_a_process():
    proc = subprocess.run([sys.executable, "-m", "xcli", "train", "no-such.zarr", "-o", "x.safetensors"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_check_output_refuses_to_clobber(tmp_path):
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(BadInput, match="--overwrite"):
        files.check_output(target)
    assert files.check_output(target, overwrite=True) == target
    with pytest.raises(BadInput, match="does not exist"):
        files.check_output(tmp_path / "missing" / "out.bin")


def test_atomic_path_file_and_folder(tmp_path):
    target = tmp_path / "result.txt"
    with files.atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()
    assert target.read_text() == "new"

    folder = tmp_path / "store"
    folder.mkdir()
    (folder / "old").write_text("x")
    with files.atomic_path(folder, overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "fresh").write_text("y")
    assert sorted(p.name for p in folder.iterdir()) == ["fresh"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_atomic_path_gives_files_the_mode_open_would(tmp_path):
    """safetensors creates its files 0600; outputs get the usual mode under the user's umask."""
    import os

    from safetensors.numpy import save_file

    target = tmp_path / "x.safetensors"
    with files.atomic_path(target) as tmp:
        save_file({"a": np.zeros(2)}, str(tmp))
    assert target.stat().st_mode & 0o777 == 0o666 & ~files.UMASK
    os.umask(files.UMASK)  # the test reads it the same way; nothing changed


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.txt"
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_removes_temps_of_dead_writers_and_keeps_live_ones(tmp_path):
    """kill -9 leaves `.NAME.tmp-PID-xxxxxxxx`; the next writer of NAME removes it if PID is dead."""
    import os
    import subprocess

    target = tmp_path / "x.zarr"
    dead = tmp_path / ".x.zarr.tmp-99999999-abcd1234"
    (dead / "acts").mkdir(parents=True)
    (dead / "acts" / "chunk").write_bytes(b"0" * 100)
    dead_file = tmp_path / ".x.zarr.tmp-99999998-0000ffff"
    dead_file.write_text("partial")
    child = subprocess.Popen(["sleep", "60"])
    try:
        live = [tmp_path / f".x.zarr.tmp-{os.getpid()}-12345678", tmp_path / f".x.zarr.tmp-{child.pid}-87654321"]
        for p in live:
            p.mkdir()
        other = [tmp_path / ".y.zarr.tmp-99999999-abcd1234", tmp_path / ".x.zarr.tmp-99999999-notatemp"]
        for p in other:  # another target's temp, and a name temp_path_for never makes
            p.mkdir()
        with files.atomic_path(target) as tmp:
            tmp.mkdir()
        assert target.is_dir() and not dead.exists() and not dead_file.exists()
        assert all(p.exists() for p in live + other)
    finally:
        child.kill()
        child.wait()


def test_a_killed_synth_leaves_no_temp_after_the_next_write(tmp_path):
    stale = tmp_path / ".x.zarr.tmp-99999999-abcd1234"
    (stale / "acts").mkdir(parents=True)
    result = run(["synth", "diff", "--tokens", "256", "--chunk-rows", "128", "-o", str(tmp_path / "x.zarr")])
    assert result.exit_code == 0, result.output
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir())[:1] != [stale.name]


def test_dash_reads_one_path_from_stdin(monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("/tmp/acts.zarr\n"))
    assert files.read_path_argument("-") == "/tmp/acts.zarr"
    assert files.read_path_argument("plain.zarr") == "plain.zarr"
    monkeypatch.setattr("sys.stdin", io.StringIO("a\nb\n"))
    with pytest.raises(BadInput, match="one path"):
        files.read_path_argument("-")


# -- one writer per output ---------------------------------------------------------------------------

def test_output_lock_refuses_a_second_writer_and_goes_away(tmp_path):
    target = tmp_path / "x.safetensors"
    with files.output_lock(target):
        assert (tmp_path / ".x.safetensors.lock").exists()
        with pytest.raises(BadInput, match=r"being written by another xc process \(pid \d+\)"):
            with files.output_lock(target):
                pass
    assert list(tmp_path.iterdir()) == []
    with files.output_lock(target):  # free again
        pass


@pytest.mark.parametrize("command", ["synth", "train", "harvest", "export"])
def test_a_second_writer_of_the_same_output_exits_2_at_once(tmp_path, command, tiny, corpus_file):
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "x"
    store = tmp_path / "s.zarr"
    if command == "train":
        assert CliRunner().invoke(cli, ["synth", "diff", "--tokens", "2048", "--chunk-rows", "256",
                                        "-o", str(store)]).exit_code == 0
    args = {"synth": ["synth", "diff", "-o", str(out)],
            "train": ["train", str(store), "-o", str(out)],
            "harvest": ["harvest", "-m", str(tiny["gpt2"]), "--layers", "0", "-d", str(corpus_file), "-o", str(out)],
            "export": ["export", str(tmp_path / "x.safetensors"), "--format", "saelens", "-o", str(out)]}
    with files.output_lock(out):
        result = CliRunner().invoke(cli, args[command])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is being written by another xc process" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


HOLDER = """
import sys
from xcli.files import output_lock
with output_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.mark.parametrize("ending", ["finishes", "is killed with -9"])
def test_a_lock_held_by_another_process_and_what_it_leaves(tmp_path, ending):
    """Another process writing the output (here a stand-in that holds the lock): xc stops at once and names
    it. Once it finishes, or dies by kill -9 (the OS drops its lock; a stale lock file stays), xc runs."""
    out = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    second = subprocess.run([sys.executable, "-m", "xcli", "synth", "diff", "--tokens", "4096", "-o", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and second.stdout == "" and f"(pid {holder.pid})" in second.stderr
    if ending == "finishes":
        holder.communicate("")
        assert not (tmp_path / ".s.zarr.lock").exists()
    else:
        holder.kill()
        holder.wait()
        assert (tmp_path / ".s.zarr.lock").exists()
    third = subprocess.run([sys.executable, "-m", "xcli", "synth", "diff", "--tokens", "4096", "-o", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0 and third.stdout.strip() == str(out), third.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr", "s.zarr.truth.safetensors"]
