import shutil
import subprocess

import pytest

from xcli.cli import manpage


def test_man_pages_match_the_click_definitions():
    expected = manpage.pages()
    for name, text in expected.items():
        path = manpage.MAN_DIR / name
        assert path.exists(), f"{path} is missing; run `python -m xcli.cli.manpage`"
        assert path.read_text() == text, f"{path} is stale; run `python -m xcli.cli.manpage`"
    on_disk = {p.name for p in manpage.MAN_DIR.glob("*.1")}
    assert on_disk == set(expected), "man/ has section-1 pages for commands that do not exist"


def test_cli_reference_matches_the_click_definitions():
    assert manpage.REFERENCE.read_text() == manpage.reference(), \
        "docs/cli-reference.md is stale; run `python -m xcli.cli.manpage`"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_pages_render():
    for path in sorted(manpage.MAN_DIR.glob("*.[15]")):
        proc = subprocess.run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u", "-ww", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "NAME" in proc.stdout
        assert "warning" not in proc.stderr, f"{path.name}: {proc.stderr}"


def test_every_man_page_is_installed_with_the_package():
    """pyproject.toml's data-files put them in <prefix>/share/man, where `man xc-train` finds them."""
    import tomllib

    data_files = tomllib.loads((manpage.ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    installed = {p.name for section, globs in data_files.items() if section.startswith("share/man/man")
                 for pattern in globs for p in manpage.ROOT.glob(pattern)}
    assert installed == {p.name for p in manpage.MAN_DIR.glob("*.[15]")}
    for section, globs in data_files.items():
        assert all(pattern.endswith("." + section[-1]) for pattern in globs)
