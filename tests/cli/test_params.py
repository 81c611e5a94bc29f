"""Options are declared once, on the config dataclasses, and the command line is generated from them."""

import ast
import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

import xcli
from xcli.analysis.config import ClassifyConfig, EvalConfig
from xcli.cli import cli
from xcli.cli.params import build, config_options
from xcli.data.config import HarvestConfig, SynthSpec, SynthStore
from xcli.export.config import ExportConfig
from xcli.lm.config import AmplifyConfig, Sampling, SteerConfig
from xcli.options import count, name_list, option, option_of, pair, whole_numbers
from xcli.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
COMMAND_CONFIGS = {
    "harvest": [HarvestConfig], "train": [TrainConfig], "classify": [ClassifyConfig], "eval": [EvalConfig],
    "export": [ExportConfig], "amplify": [AmplifyConfig, SteerConfig, Sampling], "synth": [SynthSpec, SynthStore],
}


def declared(config):
    return [f for f in dataclasses.fields(config) if option_of(f) is not None]


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_every_declared_field_is_one_parameter_of_its_command_with_the_declared_help(command):
    params = {p.name: p for p in cli.commands[command].params}
    for config in COMMAND_CONFIGS[command]:
        for f in declared(config):
            param = params.pop(f.name, None) if f.name in params else None
            if param is None:  # shared by two configs of one command (amplify): already taken
                assert any(f.name in {g.name for g in declared(c)} for c in COMMAND_CONFIGS[command] if c is not config)
                continue
            how = option_of(f)
            if isinstance(param, click.Option):
                assert param.help.startswith(how.help), (command, f.name)
                flags = how.flags or ("--" + f.name.replace("_", "-"),)
                assert tuple(param.opts + param.secondary_opts) == flags
    # What is left is declared by the command itself: options that belong to no config.
    left = {name for name, p in params.items() if name not in ("quiet", "debug")}
    own = {"classify": {"checkpoint", "store", "plot_dir", "fmt", "output", "overwrite"}, "export": {"check_dir"},
           "amplify": {"prompts_file"}, "synth": {"spec", "output"}}
    assert left == own.get(command, set())


@pytest.mark.parametrize("command", sorted(COMMAND_CONFIGS))
def test_command_line_defaults_are_the_field_defaults(command):
    """Leaving every optional option out builds the config Python callers get from its defaults."""
    params = {p.name: p for p in cli.commands[command].params}
    for config in COMMAND_CONFIGS[command]:
        if config is SynthSpec:  # its options default to None, so that a spec file's values stay
            continue
        for f in declared(config):
            if f.default is dataclasses.MISSING or f.name not in params:
                continue
            param = params[f.name]
            with click.Context(cli.commands[command]) as ctx:
                value = param.type_cast_value(ctx, param.get_default(ctx)) if param.get_default(ctx) is not None \
                    else None
            expected = f.default
            if param.multiple:
                value = tuple(value or ())
            assert value == expected, (command, f.name, value, expected)


def test_synth_help_states_the_spec_defaults_and_the_options_default_to_none():
    params = {p.name: p for p in cli.commands["synth"].params}
    record = params["shared"].get_help_record(click.Context(cli.commands["synth"]))[1]
    assert not params["shared"].required and record.endswith("Default: 48.")  # no click [default: ...]
    assert "Default: 0.5,1.5." in params["magnitude"].help


def test_a_new_field_is_a_new_option_with_nothing_else_to_write():
    @dataclass(frozen=True)
    class Toy:
        size: int = option(help="How many.", metavar="N", parse=count)
        names: tuple[str, ...] | None = option(None, "Which ones.", metavar="NAMES", parse=name_list)
        band: tuple[float, float] = option((0.2, 0.8), "Where.", metavar="LOW,HIGH", parse=pair(",", float, "LOW,HIGH"),
                                           cli_default="0.2,0.8")
        mode: str = option("fast", "How.", choices=("fast", "slow"))
        loud: bool = option(False, "Say so.")
        tags: tuple[str, ...] = option((), "A tag; repeatable.", flags=("-t", "--tag"), multiple=True)
        hidden: int = 3  # Python callers only

    seen = {}

    @click.command()
    @config_options(Toy)
    def toy(**values):
        seen["config"] = build(Toy, values)

    runner = CliRunner()
    result = runner.invoke(toy, ["--size", "2K", "--names", "a,b", "--mode", "slow", "-t", "x", "--tag", "y"])
    assert result.exit_code == 0, result.output
    assert seen["config"] == Toy(size=2000, names=("a", "b"), mode="slow", tags=("x", "y"))
    assert "--hidden" not in runner.invoke(toy, ["--help"]).output
    bad = runner.invoke(toy, ["--size", "2.5"])
    assert bad.exit_code == 2 and "'2.5' is not a whole number" in bad.output
    missing = runner.invoke(toy, [])
    assert missing.exit_code == 2 and "--size" in missing.output
    bad_pair = runner.invoke(toy, ["--size", "1", "--band", "0.1"])
    assert bad_pair.exit_code == 2 and "'0.1' is not two values written LOW,HIGH" in bad_pair.output


def test_parsers():
    assert count("10M") == 10_000_000 and count("50k") == 50_000 and count("1_000") == 1000 and count(7) == 7
    with pytest.raises(ValueError, match="not a count"):
        count("ten")
    assert name_list(" a, b ,,c") == ("a", "b", "c") and name_list("") == ()
    assert whole_numbers("8,4,2") == (8, 4, 2)
    with pytest.raises(ValueError, match="whole numbers"):
        whole_numbers("8,x")
    assert pair("-", int, "MIN-MAX")("1-4") == (1, 4)
    with pytest.raises(ValueError, match="MIN-MAX"):
        pair("-", int, "MIN-MAX")("1-")


def test_the_command_line_imports_neither_torch_nor_zarr():
    code = "import sys, xcli.cli; print(sorted(m for m in ('torch', 'zarr', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def import_graph() -> dict[str, set[str]]:
    """xcli module -> the xcli modules it imports, at the top or inside functions."""
    package = ROOT / "xcli"
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xcli"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("xcli"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles_counting_imports_inside_functions():
    graph = import_graph()
    # A package's __init__ is imported whenever one of its modules is; an import of a package that
    # only names a submodule is an import of that submodule, so edges into __init__ files count only
    # for the names they define themselves.
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_old_module_paths_still_import_as_the_modules_that_replaced_them():
    from xcli.data import store
    from xcli.harvest import HarvestConfig as OldHarvestConfig
    from xcli.harvest import harvest
    from xcli.store import open_store

    assert OldHarvestConfig is HarvestConfig and open_store is store.open_store
    assert harvest.__module__ == "xcli.data.harvest"
    for old, new in xcli.MOVED.items():
        assert sys.modules.get(old) is None or sys.modules[old] is sys.modules[new]
    from xcli.train import TrainConfig as T
    from xcli.train import train

    assert T is TrainConfig and train.__module__ == "xcli.train.loop"
