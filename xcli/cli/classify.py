"""`xc classify`: label every latent of a crosscoder."""

import contextlib
import sys

import click

from xcli import console
from xcli.analysis.config import ROW_FORMATS, ClassifyConfig
from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.files import read_path_argument
from xcli.options import OVERWRITE_RULE


@click.command("classify")
@click.argument("checkpoint")
@click.option("--store", metavar="STORE", help="Activation store (a Zarr folder) holding the checkpoint's "
              "sources: adds frequency, mean and max activation, Latent Scaling and, for cross-layer "
              "crosscoders, functional coherence.")
@config_options(ClassifyConfig)
@click.option("--plot", "plot_dir", metavar="DIR", help="Also draw figures into DIR (created if missing): "
              "relative_norm.png, cosine_shared.png, layer_profiles.png (cross-layer), latent_scaling.png "
              "(with --store). Needs matplotlib: pip install 'xcli[plot]'.")
@click.option("--format", "fmt", type=click.Choice(ROW_FORMATS), default="jsonl", show_default=True,
              help="Rows as JSON lines, CSV (nested fields as field.key columns) or an aligned text table of "
                   "the main columns.")
@click.option("-o", "--output", metavar="FILE", help="Write the rows to FILE (atomically) and print its "
              "path, instead of writing the rows to stdout.")
@click.option("--overwrite", is_flag=True, help=f"Replace an existing output file or figures. {OVERWRITE_RULE}")
@common_options
def command(checkpoint, store, plot_dir, fmt, output, overwrite, **options):
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
    from xcli.files import output_lock

    with output_lock(output) if output else contextlib.nullcontext():  # one writer per -o
        run(checkpoint, store, plot_dir, fmt, output, overwrite, build(ClassifyConfig, options))
    if output:
        click.echo(output)


def run(checkpoint, store, plot_dir, fmt, output, overwrite, config: ClassifyConfig) -> None:
    from xcli.analysis import classify as cl
    from xcli.crosscoder.model import load
    from xcli.data.store import open_store
    from xcli.files import atomic_path, check_output, check_replaceable

    if config.max_tokens is not None and not store:
        raise BadInput("--max-tokens applies to the store pass; give --store STORE as well")
    checkpoint = read_path_argument(checkpoint)
    inputs = [checkpoint, store]  # never replaced by --overwrite
    if output:
        check_output(output, overwrite=overwrite)
        if overwrite:
            check_replaceable(output, "file", inputs)
    if plot_dir:
        from xcli.analysis import plots

        plots.require_matplotlib()
        plots.check_plot_dir(plot_dir, overwrite, inputs)
    model = load(checkpoint)
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
        for path in plots.write_plots(result, plot_dir, overwrite, inputs):
            console.info(f"wrote {path}")
    if not console.settings.quiet:
        cl.print_summary(result, sys.stderr)
