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
not_built("amplify", "model-diff amplification and latent steering")
not_built("export", "Neuronpedia export of feature dashboards")


def _pair(value: str | None, option: str) -> tuple[str, str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise BadInput(f"{option} {value!r} must be two comma-separated values, e.g. A,B")
    return parts[0], parts[1]


def _band(value: str) -> tuple[float, float]:
    low, high = _pair(value, "--shared-band")
    try:
        return float(low), float(high)
    except ValueError:
        raise BadInput(f"--shared-band {value!r} must be two numbers LOW,HIGH, e.g. 0.3,0.7") from None


@cli.command("classify")
@click.argument("checkpoint")
@click.option("--store", metavar="STORE", help="Activation store (a Zarr folder) holding the checkpoint's "
              "sources: adds frequency, mean and max activation, Latent Scaling and, for cross-layer "
              "crosscoders, functional coherence.")
@click.option("--models", metavar="A,B", help="The two models to compare: r, delta norm and cosine are "
              "oriented B over A (1 = only B). Default: the two models in checkpoint order.")
@click.option("--exclusive-share", type=float, default=0.9, show_default=True,
              help="Exclusive to a model when it holds at least this share of the latent's decoder norm "
              "(two models: r <= 0.1 or r >= 0.9).")
@click.option("--shared-band", default="0.3,0.7", show_default=True, metavar="LOW,HIGH",
              help="Shared when LOW <= r <= HIGH; with more than two models, when every model holds at "
              "least 2*LOW/n of the norm. Anything neither shared nor exclusive is 'mixed'.")
@click.option("--dead-frequency", type=float, default=0.0, show_default=True,
              help="With --store: dead when the latent fires on at most this fraction of tokens. "
              "Without a store only latents with no decoder norm are dead.")
@click.option("--nu-epsilon", type=float, default=0.2, show_default=True,
              help="Latent Scaling: an exclusive latent with nu_epsilon at or above this is flagged "
              "'shrinkage' (the other model carries its direction in its reconstruction error).")
@click.option("--nu-r", type=float, default=0.5, show_default=True,
              help="Latent Scaling: an exclusive latent with nu_r at or above this is flagged "
              "'decoupling' (other latents rebuild its direction in the other model).")
@click.option("--span-share", type=float, default=0.1, show_default=True,
              help="Cross-layer: a layer is in a latent's span when it holds at least this share of "
              "the latent's decoder norm.")
@click.option("--max-tokens", type=int, help="With --store: use only the first N tokens.")
@click.option("--device", default="auto", show_default=True,
              help="Torch device for the store pass: auto (cuda when available), cpu, cuda, cuda:1, ...")
@click.option("--plot", "plot_dir", metavar="DIR", help="Also draw figures into DIR (created if missing): "
              "relative_norm.png, cosine_shared.png, layer_profiles.png (cross-layer), latent_scaling.png "
              "(with --store). Needs matplotlib: pip install 'xcli[plot]'.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "table"]), default="jsonl",
              show_default=True, help="Rows as JSON lines, CSV (nested fields as field.key columns) or "
                                      "an aligned text table of the main columns.")
@click.option("-o", "--output", metavar="FILE", help="Write the rows to FILE (atomically) and print its "
              "path, instead of writing the rows to stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file or figures.")
@common_options
def classify_command(checkpoint, store, models, exclusive_share, shared_band, dead_frequency, nu_epsilon, nu_r,
                     span_share, max_tokens, device, plot_dir, fmt, output, overwrite):
    """Label every latent of a crosscoder: shared, exclusive:<model>, mixed or dead.

    Sources are grouped by model. For two models A and B each row carries
    the decoder norms, r = ||d_B|| / (||d_A|| + ||d_B||) as rel_norm_B_over_A,
    the max-normalised score of Minder et al. as delta_norm_B_over_A (both:
    0 = only A, 1 = only B) and the decoder cosine. With --store: frequency,
    mean and max activation, and Latent Scaling (beta_error, beta_reconstruction,
    nu_epsilon, nu_r and ls_verdict: specific, shrinkage, decoupling) that flags
    exclusive latents whose exclusivity is a sparsity artifact. Cross-layer
    crosscoders add layer_share, peak_layer, span_layers and (with --store)
    functional_coherence, the effective number of layers driving the latent.

    Rows go to stdout as JSON lines, one per latent, with at least "latent"
    and "class"; a summary table goes to stderr. CHECKPOINT may be '-' to read
    its path from stdin.

    \b
    Examples:
      xc classify xc.safetensors > latents.jsonl
      xc classify xc.safetensors --store acts.zarr --models base,chat --plot figs
      xc train acts.zarr -o xc.safetensors | xc classify - --format table
      xc classify xc.safetensors | jq -c 'select(.class == "exclusive:chat")'
    """
    from xcli import classify as cl
    from xcli.crosscoder import load
    from xcli.files import atomic_path, check_output, read_path_argument
    from xcli.store import open_store

    config = cl.ClassifyConfig(
        models=_pair(models, "--models"), exclusive_share=exclusive_share, shared_band=_band(shared_band),
        dead_frequency=dead_frequency, nu_epsilon=nu_epsilon, nu_r=nu_r, span_share=span_share,
        max_tokens=max_tokens, device=_device(device))
    if output:
        check_output(output, overwrite=overwrite)
    if plot_dir:
        from xcli import plots

        plots.require_matplotlib()
        plots.check_plot_dir(plot_dir, overwrite)
    model = load(read_path_argument(checkpoint))
    result = cl.classify(model, open_store(store) if store else None, config)
    for note in result.notes:
        console.warn(note)
    if output:
        with atomic_path(output, overwrite=overwrite) as tmp:
            with open(tmp, "w", newline="") as out:
                cl.write_rows(result, fmt, out)
    else:
        cl.write_rows(result, fmt, sys.stdout)
        sys.stdout.flush()
    if plot_dir:
        for path in plots.write_plots(result, plot_dir, overwrite):
            console.info(f"wrote {path}")
    if not console.settings.quiet:
        cl.print_summary(result, sys.stderr)
    if output:
        click.echo(output)


def _device(value: str) -> str:
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except RuntimeError:
        raise BadInput(f"--device {value!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"--device {value!r}: CUDA is not available on this machine; use cpu")
    return value


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
