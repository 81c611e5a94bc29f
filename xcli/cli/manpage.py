"""Generate the section-1 man pages and docs/cli-reference.md from the click definitions.

`python -m xcli.cli.manpage` rewrites man/xc.1, man/xc-<command>.1 and
docs/cli-reference.md (every command's --help); a test fails when they differ from
what this would write, so they cannot drift from `--help`, which is generated from the
config dataclasses. Section-5 pages (file formats) are written by hand.
"""

import re
from datetime import date
from pathlib import Path

import click

from xcli.version import __version__

ROOT = Path(__file__).resolve().parents[2]
MAN_DIR = ROOT / "man"
REFERENCE = ROOT / "docs" / "cli-reference.md"
# Fixed so that regenerating without a change gives identical files.
PAGE_DATE = date(2026, 11, 1).isoformat()

EXIT_STATUS = [
    ("0", "Success."),
    ("1", "Runtime failure (the input was valid but the job could not finish)."),
    ("2", "Usage error or bad input; one line on stderr names the bad value."),
    ("130", "Interrupted (Ctrl-C). Resumable jobs continue with --resume."),
]


def escape(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    # A line starting with . or ' would be read as a roff request.
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.M)


def paragraphs(help_text: str) -> list[str]:
    """Click help text as roff: blank lines separate paragraphs; \\b keeps lines."""
    out = []
    for block in re.split(r"\n\s*\n", help_text.strip()):
        lines = block.splitlines()
        if lines and lines[0].strip() == "\b":
            out.append(".PP\n.nf\n" + escape("\n".join(lines[1:])) + "\n.fi")
        else:
            out.append(".PP\n" + escape(" ".join(line.strip() for line in lines)))
    return out


def option_entry(ctx: click.Context, param: click.Parameter) -> str | None:
    if not isinstance(param, click.Option):
        return None
    record = param.get_help_record(ctx)
    if record is None:
        return None
    names, help_text = record
    return f".TP\n.B {escape(names)}\n{escape(help_text)}"


def render(command: click.Command, path: list[str], see_also: list[str]) -> str:
    name = "-".join(path)
    parent = click.Context(click.Group(path[0])) if len(path) > 1 else None
    ctx = click.Context(command, info_name=path[-1], parent=parent, help_option_names=["-h", "--help"])
    help_text = command.help or ""
    summary = command.get_short_help_str(limit=120)
    lines = [
        f'.TH {name.upper()} 1 "{PAGE_DATE}" "xc {__version__}" "xc manual"',
        ".SH NAME",
        f"{escape(name)} \\- {escape(summary)}",
        ".SH SYNOPSIS",
        ".B " + escape(" ".join(path)),
        escape(" ".join(command.collect_usage_pieces(ctx))),
        ".SH DESCRIPTION",
        *paragraphs(help_text),
    ]
    arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument)]
    if arguments:
        lines.append(".SH ARGUMENTS")
        lines += [f".TP\n.B {escape(a.make_metavar(ctx))}\n{escape(getattr(a, 'help', None) or '')}"
                  for a in arguments]
    options = [e for p in command.get_params(ctx) if (e := option_entry(ctx, p))]
    if options:
        lines += [".SH OPTIONS", *options]
    if isinstance(command, click.Group):
        lines.append(".SH COMMANDS")
        for sub_name, sub in sorted(command.commands.items()):
            lines.append(f".TP\n.BR {escape(name)}\\-{escape(sub_name)} (1)\n"
                         f"{escape(sub.get_short_help_str(limit=120))}")
    if command.epilog:
        lines += [".SH EXAMPLES", *paragraphs(command.epilog)]
    lines.append(".SH EXIT STATUS")
    lines += [f".TP\n.B {code}\n{escape(text)}" for code, text in EXIT_STATUS]
    if see_also:
        lines.append(".SH SEE ALSO")
        lines.append(",\n".join(f".BR {escape(page)} ({section})" for page, section in see_also))
    return "\n".join(lines) + "\n"


def pages() -> dict[str, str]:
    """File name -> roff text for xc(1) and one page per subcommand."""
    from xcli.cli import cli

    section5 = [("xc-store", 5), ("xc-checkpoint", 5)]
    subs = sorted(cli.commands)
    out = {"xc.1": render(cli, ["xc"], section5)}
    for sub in subs:
        others = [(f"xc-{s}", 1) for s in subs if s != sub]
        command = cli.commands[sub]
        extra = [(page, 5) for page in SECTION5_OF.get(sub, ())]
        out[f"xc-{sub}.1"] = render(command, ["xc", sub], [("xc", 1), *others, *extra, *section5])
        for name, child in sorted(getattr(command, "commands", {}).items()):  # a group's commands: a page each
            siblings = [(f"xc-{sub}-{n}", 1) for n in sorted(command.commands) if n != name]
            out[f"xc-{sub}-{name}.1"] = render(child, ["xc", sub, name], [(f"xc-{sub}", 1), *siblings, *extra])
    return out


SECTION5_OF = {"track": ("xc-registry",)}
"""Section-5 pages that belong to one command."""


def command_at(path: list[str]) -> click.Command:
    from xcli.cli import cli

    command = cli
    for name in path[1:]:
        command = command.commands[name]
    return command


def all_paths() -> list[list[str]]:
    from xcli.cli import cli

    paths = [["xc"]]
    for name in sorted(cli.commands):
        paths.append(["xc", name])
        paths += [["xc", name, child] for child in sorted(getattr(cli.commands[name], "commands", {}))]
    return paths


def help_text(path: list[str]) -> str:
    """`xc [COMMAND [SUBCOMMAND]] --help` as a terminal 80 columns wide shows it."""
    command = command_at(path)
    parent = None
    for depth in range(1, len(path)):  # the chain of contexts, so that usage lines name the whole path
        parent = click.Context(command_at(path[:depth]), info_name=path[depth - 1], parent=parent)
    ctx = click.Context(command, info_name=path[-1], parent=parent, help_option_names=["-h", "--help"],
                        terminal_width=80, max_content_width=80)
    return command.get_help(ctx)


def reference() -> str:
    """docs/cli-reference.md: the --help of `xc` and of every command."""
    lines = ["# Command-line reference", "",
             "Every command's `--help`, generated by `python -m xcli.cli.manpage` from the option declarations "
             "(the config dataclasses); do not edit by hand. Each command also has a page under "
             "[commands/](commands/) and a man page (`man xc-COMMAND`).", ""]
    for path in all_paths():
        lines += [f"## {' '.join(path)}", "", "```", help_text(path).rstrip(), "```", ""]
    return "\n".join(lines)


def write(directory: Path = MAN_DIR, reference_path: Path = REFERENCE) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, text in pages().items():
        target = directory / fname
        target.write_text(text)
        written.append(target)
    reference_path.write_text(reference())
    return [*written, reference_path]


if __name__ == "__main__":
    for p in write():
        print(p)
