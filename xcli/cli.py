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
from xcli.files import read_path_argument
from xcli.store import CODECS, DEFAULT_CHUNK_ROWS, DEFAULT_CODEC
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


class TokenCount(click.ParamType):
    """A positive count with an optional k, M or G suffix (powers of ten): 500k, 10M."""

    name = "N"
    SCALE = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip()
        scale = self.SCALE.get(text[-1:], 1)
        number = text[:-1] if scale > 1 else text
        try:
            count = int(float(number) * scale) if scale > 1 else int(number)
        except ValueError:
            self.fail(f"{value!r} is not a count (e.g. 100000, 500k, 10M)", param, ctx)
        if count < 1:
            self.fail(f"{value!r} must be at least 1", param, ctx)
        return count


@cli.command("harvest", epilog="""\b
Examples:
  xc harvest --model gpt2 --layers 6 --data corpus.txt --tokens 10M -o acts.zarr
  xc harvest --model early=EleutherAI/pythia-160m@step100000 --model final=EleutherAI/pythia-160m \\
             --layers 2,4 --site resid_post --site mlp_out --data docs.jsonl -o diff.zarr
  xc harvest ... -o acts.zarr --resume     # continue after Ctrl-C or kill -9; a no-op when done
""")
@common_options
@click.option("-m", "--model", "models", multiple=True, required=True, metavar="[ALIAS=]ID_OR_PATH[@REVISION]",
              help="A Hugging Face model: a local folder or a hub id already in the local cache (xc never "
                   "downloads). Repeat for several models (model diffing): all see the same tokens and must "
                   "share one vocabulary. ALIAS names the model in the store (default: the folder name).")
@click.option("-l", "--layers", metavar="SPEC",
              help="Blocks to read, counted from 0: 6, 4-8 (inclusive), 0,3,6 or all. Needed by the named "
                   "sites and by module paths containing {layer}.")
@click.option("-s", "--site", "sites", multiple=True, default=("resid_post",), show_default=True,
              metavar="SITE",
              help="What to read at each layer, repeatable: resid_post (output of block L; for the last "
                   "block this is before the final norm), resid_pre (input of block L), attn_out or mlp_out "
                   "(what the attention or MLP sublayer adds to the residual stream), or a MODULE.PATH "
                   "whose output is read, e.g. h.3.mlp.c_fc; {layer} in a path is replaced by each layer.")
@click.option("-d", "--data", required=True, metavar="FILE|DIR|NAME|-",
              help="The corpus: a text file with one document per line, a .jsonl file (see --text-field), a "
                   "folder of .txt files (one document each), - for stdin, or a Hugging Face dataset name "
                   "from the local cache when the 'datasets' package is installed.")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl records and dataset rows.")
@click.option("--split", default="train", show_default=True, help="Dataset split, for dataset names.")
@click.option("-c", "--context-length", type=int, metavar="N",
              help="Tokens per window, special tokens included. Documents are packed into windows with "
                   "EOS between them; longer ones continue in the next window. Default: 1024, or less if a "
                   "model accepts fewer positions.")
@click.option("-t", "--tokens", type=TokenCount(), metavar="N",
              help="Stop after storing N token rows (500k, 10M and 1G are accepted). Default: the whole "
                   "corpus. A corpus with fewer tokens is stored whole, with a warning.")
@click.option("-b", "--batch-size", type=int, default=8, show_default=True, metavar="N",
              help="Windows per forward pass.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
              show_default=True, help="Dtype the models compute in; auto keeps the dtype they were saved in.")
@click.option("--store-dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True,
              help="Dtype of the stored activations. auto: bfloat16 when a model computes in bfloat16 "
                   "(stored losslessly as its bits), else float16. Values beyond the float16 range stop the "
                   "run with an error; they are never stored as inf.")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where the models run; auto picks the first GPU if there is one.")
@click.option("--keep-special-tokens", is_flag=True,
              help="Also store rows of BOS, EOS and other special tokens (their large norms can dominate "
                   "training). Padding is never stored.")
@click.option("--chunk-rows", type=int, default=DEFAULT_CHUNK_ROWS, show_default=True, metavar="N",
              help="Token rows per Zarr chunk: the unit of reading, writing and resuming.")
@click.option("--codec", type=click.Choice(list(CODECS)), default=DEFAULT_CODEC, show_default=True,
              help="Chunk compression. Activations compress little (about 1.1x for float16); zstd saves "
                   "some disk at a large cost in read speed.")
@click.option("-o", "--output", required=True, type=click.Path(), metavar="STORE",
              help="The activation store to write (a folder, see xc-store(5)).")
@click.option("--resume", is_flag=True,
              help="Continue an incomplete store written with the same arguments, or start it if it is "
                   "missing. The result equals an uninterrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def harvest_command(models, layers, sites, data, text_field, split, context_length, tokens, batch_size, dtype,
                    store_dtype, device, keep_special_tokens, chunk_rows, codec, output, resume, overwrite):
    """Run models over a text corpus and store activations in a Zarr store.

    Every model reads the same windows of token ids; the activations of the chosen layers and sites are
    streamed to STORE in chunks, one row per token. Rows of special tokens (BOS, EOS, ...) and padding are
    left out. The store path is printed on stdout; progress with tokens/s goes to stderr.

    Re-running with the same arguments on a complete store does nothing and prints the path, so a cron
    job can run the same line each time (add --resume to also continue an interrupted run).
    """
    from xcli.harvest import HarvestConfig, harvest

    config = HarvestConfig(models=tuple(models), data=data, output=output, layers=layers, sites=tuple(sites),
                           context_length=context_length, tokens=tokens, batch_size=batch_size, dtype=dtype,
                           store_dtype=store_dtype, device=device, text_field=text_field, split=split,
                           keep_special_tokens=keep_special_tokens, chunk_rows=chunk_rows, codec=codec,
                           resume=resume, overwrite=overwrite)
    click.echo(str(harvest(config)))


@cli.command("info")
@common_options
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def info_command(store, as_json):
    """Summarise an activation store: sources, widths, tokens, dtype, size and completeness.

    STORE may be - to read the path from stdin, e.g. `xc harvest ... | xc info -`.
    """
    import json

    from xcli.store import open_store

    summary = open_store(read_path_argument(store)).summary()
    if as_json:
        click.echo(json.dumps(summary))
        return
    state = "complete" if summary["complete"] else "INCOMPLETE (resume with xc harvest ... --resume)"
    click.echo(f"{summary['path']}: {summary['n_tokens']:,} tokens, {state}")
    click.echo(f"  dtype {summary['dtype']}, chunks of {summary['chunk_rows']} rows, codec {summary['codec']}, "
               f"{summary['bytes_on_disk'] / 1e6:,.1f} MB on disk")
    if summary["context_length"] or summary["dataset"]:
        click.echo(f"  context {summary['context_length']}, data {summary['dataset']}")
    width = max(len(s["name"]) for s in summary["sources"])
    click.echo(f"  {'source':<{width}}  {'model':<12} {'site':<12} {'layer':>5} {'d':>6}")
    for s in summary["sources"]:
        layer = "-" if s["layer"] is None else s["layer"]
        click.echo(f"  {s['name']:<{width}}  {s['model']:<12} {s['site']:<12} {layer:>5} {s['d']:>6}")
not_built("train", "train a crosscoder from activation stores")
not_built("classify", "label latents as shared, exclusive or mixed")
not_built("amplify", "model-diff amplification and latent steering")
not_built("export", "Neuronpedia export of feature dashboards")


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
