"""The README, the docs, CI and man pages agree with the code and with each other."""

import re
from pathlib import Path

import pytest

from xcli.cli import cli

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
README_MAX_LINES = 250


def command_names() -> list[str]:
    return sorted(cli.commands)


def doc_files() -> list[Path]:
    docs = sorted((ROOT / "docs").rglob("*.md"))
    return [ROOT / "README.md", *docs, ROOT / "benchmarks" / "README.md"]


def name(path: Path) -> str:
    return str(path.relative_to(ROOT))


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    """Targets of the markdown links in text that point into the repository."""
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http:, https:, mailto:, ... and anchors within the page
        targets.append(target.split("#", 1)[0])
    return targets


def readme_test_command() -> str:
    lines = [line.strip() for line in README.splitlines() if "-m pytest" in line]
    assert len(lines) == 1, "README must hold exactly one test command"
    return lines[0]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert readme_test_command() in ci.splitlines()


def test_every_command_is_linked_from_the_readme_and_has_a_man_page():
    for command in command_names():
        assert f"(docs/commands/xc-{command}.md)" in README, f"README does not link xc {command}'s page"
        assert (ROOT / "man" / f"xc-{command}.1").exists()


def test_every_command_has_a_docs_page():
    for command in command_names():
        page = ROOT / "docs" / "commands" / f"xc-{command}.md"
        assert page.exists(), f"{name(page)} is missing"
        assert f"# xc {command}" in page.read_text().splitlines()[0]


def test_readme_is_short():
    lines = len(README.splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move details to docs/"


def test_relative_links_point_to_files():
    broken = []
    for path in doc_files():
        for target in relative_links(path.read_text()):
            resolved = (path.parent / target).resolve()
            if not resolved.exists():
                broken.append(f"{name(path)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_links():
    text = "[a](docs/x.md#part) [b](https://example.org) [c](#here) `[d](not/a/link.md)`"
    assert relative_links(text) == ["docs/x.md"]


@pytest.mark.parametrize("path", doc_files(), ids=name)
def test_docs_cite_nothing_a_reader_cannot_see(path):
    text = path.read_text()
    assert "methods.md" not in text, f"{name(path)} mentions methods.md, which is not in the repository"
    assert "../shared" not in text, f"{name(path)} points outside the repository"
    assert not re.search(r"\bissues? #?\d+|(?<![\w&])#\d+\b", text, re.I), \
        f"{name(path)} cites an issue number; name the paper or project instead"


def test_docs_name_only_test_files_that_exist():
    missing = []
    for path in [*doc_files(), *sorted((ROOT / "xcli").rglob("*.py"))]:
        for test in re.findall(r"tests/[\w/]*test_\w+\.py", path.read_text()):
            if not (ROOT / test).exists():
                missing.append(f"{name(path)}: {test}")
    assert not missing, "\n".join(missing)
