import shutil
import subprocess

import pytest

from xcli import manpage


def test_man_pages_match_the_click_definitions():
    expected = manpage.pages()
    for name, text in expected.items():
        path = manpage.MAN_DIR / name
        assert path.exists(), f"{path} is missing; run `python -m xcli.manpage`"
        assert path.read_text() == text, f"{path} is stale; run `python -m xcli.manpage`"
    on_disk = {p.name for p in manpage.MAN_DIR.glob("*.1")}
    assert on_disk == set(expected), "man/ has section-1 pages for commands that do not exist"


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
def test_man_pages_render():
    for path in sorted(manpage.MAN_DIR.glob("*.[15]")):
        proc = subprocess.run(["groff", "-man", "-Tascii", "-P-c", "-P-b", "-P-u", "-ww", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "NAME" in proc.stdout
        assert "warning" not in proc.stderr, f"{path.name}: {proc.stderr}"
