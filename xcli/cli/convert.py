"""`xc convert`: a BatchTopK crosscoder as a JumpReLU one."""

import click

from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.files import read_path_argument
from xcli.train.config import ConvertConfig


@click.command("convert", epilog="""\b
  xc convert btk.safetensors acts.zarr -o jr.safetensors
  xc convert btk.safetensors fresh.zarr -o jr.safetensors --all-rows --max-rows 200K
  xc train acts.zarr -o btk.safetensors | xc convert - acts.zarr -o jr.safetensors""")
@config_options(ConvertConfig)
@common_options
def command(checkpoint, stores, **options):
    """Turn a BatchTopK crosscoder into a JumpReLU one with a threshold per latent.

    The weights stay. Each latent's threshold is the smallest pre-activation that BatchTopK's
    training selection (the k*B best scores of each batch) kept on the calibration rows; then
    one factor scales all thresholds so that the mean L0 on those rows is k (--target-l0).
    Calibration rows are the rows `xc train` held out (or, with --all-rows, every row of stores
    the checkpoint was not trained on). Writes the checkpoint (format in xc-checkpoint(5), with
    a "converted" record) and prints its path; L0 and FVU before and after go to stderr.

    CHECKPOINT may be '-' to read its path from stdin.
    """
    from xcli.train.convert import convert

    if checkpoint == "-" and "-" in stores:
        raise BadInput("only one argument can be '-' (read from stdin)")
    path, _ = convert(build(ConvertConfig, options, checkpoint=read_path_argument(checkpoint),
                            stores=tuple(read_path_argument(s) for s in stores)))
    click.echo(str(path))
