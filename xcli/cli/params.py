"""Click options generated from the config dataclasses, and the options every command shares.

A config field declared with `xcli.options.option` becomes one click option (or argument):
its flags, help, metavar, choices, parser and default come from the field, so each option
is written down once. Commands call `config_options(SomeConfig)` as a decorator and build
the config from the parsed values with `build`.
"""

import dataclasses
import math
import types
import typing

import click

from xcli import console
from xcli.errors import XcError
from xcli.options import Option, option_of
from xcli.ranks import for_this_rank


class Parsed(click.ParamType):
    """A click type around a parser of xcli.options: its ValueError becomes a usage error (exit 2)."""

    def __init__(self, parse, name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):  # a default given as a value, or a value parsed already
            return value
        try:
            return self.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class FiniteFloat(click.ParamType):
    """A float option: nan and inf are refused here, once for every command (exit 2)."""

    name = "float"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


FINITE_FLOAT = FiniteFloat()


def _base_type(hint):
    """int for `int | None`, float for `tuple[float, ...]`, ..."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return _base_type(args[0])
    if typing.get_origin(hint) is tuple:
        return _base_type(args[0])
    return hint


def _click_type(how: Option, hint, metavar: str | None):
    if how.parse is not None:
        return Parsed(how.parse, metavar or "TEXT")
    if how.choices is not None:
        return click.Choice(how.choices)
    base = _base_type(hint)
    return {int: click.INT, float: FINITE_FLOAT}.get(base, click.STRING)


def describe_default(value) -> str:
    """A default as the command line would write it: (0.5, 1.5) -> '0.5,1.5'."""
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def parameter(f: dataclasses.Field, hint, optional: bool = False, defaults_in_help: bool = False) -> click.Parameter:
    """The click option or argument of one config field."""
    how = option_of(f)
    flags = how.flags or ("--" + f.name.replace("_", "-"),)
    has_default = f.default is not dataclasses.MISSING
    default = how.cli_default if how.cli_default is not None else f.default
    if how.argument:
        return click.Argument([f.name], nargs=-1 if how.multiple else 1, metavar=how.metavar,
                              required=not (has_default or optional), type=_click_type(how, hint, how.metavar))
    if _base_type(hint) is bool and how.parse is None:
        return click.Option([*flags, f.name], is_flag=True, help=how.help)
    help_text, required = how.help, not (has_default or optional)
    if defaults_in_help:  # the value comes from elsewhere (a spec file) unless the option is given
        if has_default and f.default is not None:
            help_text = f"{help_text} Default: {describe_default(default)}."
        default, has_default = None, False
    # click tells "no default" from a default of None: pass one only where the field has one.
    defaults = {"default": default, "show_default": default not in (None, ())} if has_default else {}
    return click.Option([*flags, f.name], type=_click_type(how, hint, how.metavar), metavar=how.metavar,
                        multiple=how.multiple, required=required, help=help_text, **defaults)


def config_options(*configs, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                   optional: bool = False, defaults_in_help: bool = False):
    """Decorator: the options of the declared fields of `configs` (`only` these, if given; not those
    in `skip`), in field order; a field that two configs share is added once. `optional`: no option
    is required (the command checks); `defaults_in_help`: options default to None and their help
    states the field's default."""
    def decorate(command):
        seen, params = set(skip), []
        for config in configs:
            hints = typing.get_type_hints(config)
            for f in dataclasses.fields(config):
                if f.name in seen or option_of(f) is None or (only is not None and f.name not in only):
                    continue
                seen.add(f.name)
                params.append(parameter(f, hints[f.name], optional, defaults_in_help))
        # What click.option does: parameters wait on the function until click.command collects them.
        command.__dict__.setdefault("__click_params__", []).extend(reversed(params))
        return command
    return decorate


def build(config, values: dict, **extra):
    """config(**the parsed values that are its fields, **extra); under torchrun, an error every rank
    meets alike is printed by rank 0 alone."""
    names = {f.name for f in dataclasses.fields(config)}
    try:
        return config(**{k: v for k, v in values.items() if k in names}, **extra)
    except XcError as e:
        raise for_this_rank(e) from None


# -- options of every command -------------------------------------------------------------------------

def _set_quiet(ctx, param, value):
    if value:
        console.settings.quiet = True


def _set_debug(ctx, param, value):
    if value:
        console.settings.debug = True


def storage_options(f):
    """--storage-option (xcli.remote.StorageConfig) for a command without a config of its own (xc info):
    it sets the options of the URLs the command opens."""
    from xcli.remote import StorageConfig

    def configure(ctx, param, value):
        StorageConfig(storage_options=value)

    (field,) = dataclasses.fields(StorageConfig)
    param = parameter(field, typing.get_type_hints(StorageConfig)[field.name])
    param.callback, param.expose_value, param.is_eager = configure, False, True
    f.__dict__.setdefault("__click_params__", []).append(param)
    return f


def common_options(f):
    """--quiet and --debug, accepted by every command and by `xc` itself."""
    f = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                     help="Show full tracebacks and log messages even when stderr is not a terminal.")(f)
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                     help="Print nothing on stderr except errors.")(f)
    return f

