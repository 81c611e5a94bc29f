"""The `xc` command line: parse arguments, call the library, print the result.

One module per command (xcli/cli/harvest.py, train.py, ...) turns its options into a
library call and prints what was produced: a path or JSON lines on stdout. The options
are generated from the config dataclasses (xcli.cli.params). Errors are translated once,
here, in `XcGroup.main`.
"""

import os
import sys
import traceback

import click

from xcli import console
from xcli.cli import amplify, classify, convert, eval, export, harvest, import_, info, synth, track, train
from xcli.cli.params import common_options
from xcli.errors import XcError
from xcli.files import machine_refusal
from xcli.ranks import ReportedByRankZero
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
        except ReportedByRankZero as e:  # torchrun: rank 0 printed it; this rank exits alike, quietly
            code = e.exit_code
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
            refused = machine_refusal(e)  # a full disk or a read-only folder is not an xc bug
            console.error(refused or f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
            code = EXIT_FAILURE
        sys.exit(code)


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


for module in (harvest, info, train, classify, amplify, export, eval, synth, import_, track, convert):
    cli.add_command(module.command)


def main():
    cli.main(prog_name="xc")
