"""The `xc` command line: parse arguments, call the library, print the result.

Logic lives in library modules (xcli.store, xcli.harvest, ...). A command here
turns its options into a library call and prints what was produced: a path or
JSON lines on stdout. Errors are translated once, in `XcGroup.main`.
"""

import functools
import json
import os
import sys
import traceback

import click

from xcli import console
from xcli.errors import BadInput, XcError
from xcli.files import read_path_argument
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


@cli.command("export")
@click.argument("checkpoint", required=False, metavar="[CHECKPOINT|-]")
@click.option("--store", metavar="STORE", help="Activation store to read the dashboards from (xc harvest output). "
              "Needed for --format neuronpedia.")
@click.option("-o", "--output", metavar="DIR", help="Folder to write. Refused if it exists, unless --resume or "
              "--overwrite.")
@click.option("--format", "fmt", type=click.Choice(["neuronpedia", "saelens"]), default="neuronpedia",
              show_default=True, help="neuronpedia: the v1 export layout (one Neuronpedia source per written "
              "(model, layer), same feature indices in all). saelens: one SAELens SAE folder per source slice.")
@click.option("--model-id", "model_ids", multiple=True, metavar="[MODEL=]ID",
              help="Neuronpedia model id of a model of the crosscoder (e.g. base=gemma-2-2b); repeat per model. "
                   "Default: the model's name, lowercased.")
@click.option("--model-path", "model_paths", multiple=True, metavar="[MODEL=]PATH",
              help="Where to read a model's config and unembedding (offline) for the logit lens. Default: the "
                   "path or hub id recorded in the store (hub ids must be in the local Hugging Face cache).")
@click.option("--tokenizer", metavar="PATH", help="Tokenizer for token strings. Default: the one recorded in the "
              "store, else the first model's.")
@click.option("--set-name", metavar="NAME", help="Neuronpedia source set; source ids are LAYER-NAME. "
              "Default: xc-{latents}, e.g. xc-16k.")
@click.option("--features", default="all", show_default=True, metavar="SPEC",
              help="Latents to export: all, 7, 0-99 (inclusive) or a comma list such as 0-9,42.")
@click.option("--top-k", type=int, default=20, show_default=True,
              help="Top activating examples per feature (plus 5 samples in each of 5 activation intervals).")
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="Features per batch-N.jsonl.gz file (keep files per folder under 1000).")
@click.option("--window", type=int, default=64, show_default=True,
              help="Tokens shown per example: the example token, up to 3/4 of the window before it and the rest "
                   "after, never crossing into another sequence.")
@click.option("--classes", type=click.Path(dir_okay=False), metavar="CLASSIFY.jsonl",
              help="Output of `xc classify`: each latent's class and statistics go to xc-latents.jsonl and the "
                   "class counts to Source.notes.")
@click.option("--vectors", is_flag=True, help="Include each feature's decoder direction (raw units) as its "
              "steering vector. Large: d_model numbers per feature and source.")
@click.option("--creator-id", default="clkht01d40000jv08hvalcvly", show_default=True,
              help="Neuronpedia user id written as creatorId. Activations are shown only for ids listed in the "
                   "instance's PUBLIC_ACTIVATIONS_USER_IDS; the default is one of them.")
@click.option("--creator-name", default="xc", show_default=True, help="creatorName of the release and source set.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--resume", is_flag=True, help="Continue an unfinished export in DIR: finished batches are skipped.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
@click.option("--check", "check_dir", metavar="DIR", help="Validate the export in DIR against Neuronpedia's "
              "importer rules instead of exporting; print a JSON summary, or exit 2 listing the problems.")
@common_options
def export_command(checkpoint, store, output, fmt, model_ids, model_paths, tokenizer, set_name, features, top_k,
                   batch_size, window, classes, vectors, creator_id, creator_name, device, resume, overwrite,
                   check_dir):
    """Export a crosscoder's feature dashboards for Neuronpedia, or its slices as SAELens SAEs.

    Neuronpedia has no crosscoder type: each source the crosscoder writes becomes one
    Neuronpedia source MODEL/LAYER-SET, all with the same feature indices. Per feature:
    the top activating examples with their context windows, 5 samples from each of 5
    activation intervals, density, activation histogram, and the logit lens of that
    source's decoder direction. Decoder norms, relative norms and classes go to
    DIR/xc-latents.jsonl and Source.notes. Three streaming passes over the store;
    memory O(features x top-k). Prints DIR.

    \b
    Examples:
      xc export xc.safetensors --store acts.zarr -o np-export --model-id base=gemma-2-2b \\
          --model-id chat=gemma-2-2b-it --classes latents.jsonl
      xc export --check np-export
      xc export xc.safetensors --format saelens -o saes
    """
    from xcli.export import ExportConfig, export
    from xcli.neuronpedia import ExportProblems, check_export

    if check_dir is not None:
        if checkpoint is not None or output is not None:
            raise click.UsageError("--check DIR takes no CHECKPOINT and no -o")
        try:
            summary = check_export(check_dir)
        except ExportProblems as e:
            for problem in e.problems:
                console.error(problem)
            raise BadInput(f"{check_dir!r} is not ready for upload: {len(e.problems)} problem(s) listed above, "
                           f"first problem first") from None
        click.echo(json.dumps(summary))
        return
    if checkpoint is None:
        raise click.UsageError("missing CHECKPOINT (or pass --check DIR)")
    if output is None:
        raise click.UsageError("missing -o DIR")
    config = ExportConfig(checkpoint=read_path_argument(checkpoint), output=output, store=store, format=fmt,
                          model_ids=model_ids, model_paths=model_paths, tokenizer=tokenizer, set_name=set_name,
                          features=features, top_k=top_k, batch_size=batch_size, window=window, classes=classes,
                          vectors=vectors, creator_id=creator_id, creator_name=creator_name, device=device,
                          resume=resume, overwrite=overwrite)
    click.echo(str(export(config)))


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
