"""The README, CI and man pages agree with the code."""

from pathlib import Path

from xcli.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def readme_test_command() -> str:
    lines = [line.strip() for line in README.splitlines() if "-m pytest" in line]
    assert len(lines) == 1, "README must hold exactly one test command"
    return lines[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_test_command() in ci.splitlines()


def test_every_command_has_a_readme_section_and_man_page():
    for name in cli.commands:
        assert f"### xc {name}" in README, f"README has no section for xc {name}"
        assert (ROOT / "man" / f"xc-{name}.1").exists()
