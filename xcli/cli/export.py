"""`xc export`: Neuronpedia dashboards or SAELens slices of a crosscoder."""


import click

from xcli import console, strict_json
from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.export.config import ExportConfig
from xcli.files import read_path_argument


@click.command("export")
@config_options(ExportConfig, optional=True)
@click.option("--check", "check_dir", metavar="DIR", help="Validate the export in DIR against Neuronpedia's "
              "importer rules instead of exporting; print a JSON summary, or exit 2 listing the problems.")
@common_options
def command(checkpoint, output, check_dir, **options):
    """Export a crosscoder's feature dashboards for Neuronpedia, its slices as SAELens SAEs, or
    per-layer transcoders as a circuit-tracer transcoder set.

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
      xc export tc0.safetensors --transcoder tc1.safetensors --format circuit-tracer -o tcs
    """
    from xcli.export import export
    from xcli.export.neuronpedia_schema import ExportProblems, check_export

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
        click.echo(strict_json.dumps(summary))
        return
    if checkpoint is None:
        raise click.UsageError("missing CHECKPOINT (or pass --check DIR)")
    if output is None:
        raise click.UsageError("missing -o DIR")
    click.echo(str(export(build(ExportConfig, options, checkpoint=read_path_argument(checkpoint), output=output))))
