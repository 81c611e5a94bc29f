"""The `xc` command line: parse arguments, call the library, print the result.

Logic lives in library modules (xcli.store, xcli.harvest, ...). A command here
turns its options into a library call and prints what was produced: a path or
JSON lines on stdout. Errors are translated once, in `XcGroup.main`.
"""

import functools
import os
import sys
import traceback

import click

from xcli import console
from xcli.errors import BadInput, XcError
from xcli.version import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class XcGroup(click.Group):
    """A click group that maps every failure to one stderr line and an exit code."""

    def main(self, args=None, prog_name=None, **extra):
        extra.pop("standalone_mode", None)
        code = EXIT_OK
        try:
            result = super().main(args, prog_name or "xc", standalone_mode=False, **extra)
            if isinstance(result, int):  # click returns the code of --help / --version exits
                code = result
        except click.UsageError as e:
            where = e.ctx.command_path if e.ctx else "xc"
            hint = f" (see '{where} --help')" if e.ctx else ""
            print(f"{where}: error: {e.format_message()}{hint}", file=sys.stderr)
            code = EXIT_USAGE
        except click.exceptions.Exit as e:
            code = e.exit_code
        except (click.Abort, KeyboardInterrupt):
            print("xc: interrupted", file=sys.stderr)
            code = EXIT_INTERRUPTED
        except XcError as e:
            if console.settings.debug:
                traceback.print_exc()
            console.error(str(e))
            code = e.exit_code
        except BrokenPipeError:
            # The reader of our stdout went away (e.g. `xc classify ... | head`).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            code = EXIT_FAILURE
        except Exception as e:
            if console.settings.debug:
                traceback.print_exc()
            console.error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            code = EXIT_FAILURE
        sys.exit(code)


def _set_quiet(ctx, param, value):
    if value:
        console.settings.quiet = True


def _set_debug(ctx, param, value):
    if value:
        console.settings.debug = True


def common_options(f):
    """--quiet and --debug, accepted by every command and by `xc` itself."""
    f = click.option("--debug", is_flag=True, expose_value=False, callback=_set_debug,
                     help="Show full tracebacks and log messages even when stderr is not a terminal.")(f)
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_set_quiet,
                     help="Print nothing on stderr except errors.")(f)
    return f


@click.group("xc", cls=XcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="xc")
@common_options
def cli():
    """Sparse crosscoders across layers and models, as composable Unix tools.

    \b
    A typical pipeline:
      xc harvest --model base=PATH --model chat=PATH --layers 6 --data corpus.txt -o acts.zarr
      xc train acts.zarr --arch batchtopk --expansion 16 --k 32 -o xc.safetensors
      xc classify xc.safetensors --store acts.zarr > latents.jsonl

    Results go to stdout (a path, or JSON lines), so `xc A ... | xc B -` chains;
    logs and progress bars go to stderr. Exit codes: 0 ok, 1 runtime failure,
    2 bad input or usage, 130 interrupted.
    """


def not_built(name: str, issue: str):
    """Register a placeholder that says plainly the command does not exist yet."""

    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 add_help_option=True)
    @common_options
    @click.pass_context
    def placeholder(ctx):
        raise BadInput(f"'xc {name}' is not built yet in xc {__version__} ({issue})")

    placeholder.__doc__ = f"Not built yet: {issue}."
    placeholder.help = placeholder.__doc__
    return placeholder


not_built("harvest", "run models over text and store activations in a Zarr store")
not_built("train", "train a crosscoder from activation stores")
not_built("classify", "label latents as shared, exclusive or mixed")
not_built("amplify", "model-diff amplification and latent steering")
not_built("export", "Neuronpedia export of feature dashboards")


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
