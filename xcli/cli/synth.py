"""`xc synth`: a synthetic store with a planted dictionary."""

import click

from xcli.cli.params import build, common_options, config_options
from xcli.data.config import SynthSpec, SynthStore


@click.command("synth", epilog="""\b
  xc synth diff -o toy.zarr                       # a preset: diff, layers or diff-layers
  xc synth -o toy.zarr --models base,chat --shared 64 --exclusive 16 --scaled 8 --scale 0.3
  xc synth -o deep.zarr --models m --layers 8 --span 1-8 --drift 10 --exclusive 0
  xc synth spec.json -o toy.zarr --seed 3 --tokens 1M
  xc synth diff -o toy.zarr | xc train - -o toy.safetensors --k 4""")
@click.argument("spec", required=False, metavar="[PRESET|SPEC.json]")
@click.option("-o", "--output", required=True, type=click.Path(), metavar="STORE",
              help="The store to write (a folder, or a URL such as s3://BUCKET/toy.zarr); the truth goes "
                   "beside it as STORE.truth.safetensors.")
@config_options(SynthSpec, defaults_in_help=True)
@config_options(SynthStore)
@common_options
def command(spec, output, **options):
    """Write a synthetic activation store with a planted dictionary, and the truth beside it.

    Rows are x_s = sum_g c_g u_g^s (+ noise) for every source s (one layer of one model):
    the coefficients c_g are common to all sources, the directions u_g^s are planted. SPEC is
    a preset (diff: two models with shared, exclusive and scaled features; layers: one model,
    six layers, features spanning 1-6 layers with drifting directions; diff-layers: both) or a
    JSON file of the same fields as the options (e.g. {"models": ["a", "b"], "shared": 64});
    options override it. The store is an ordinary activation store (train, classify and export
    read it); `xc eval --truth STORE.truth.safetensors` scores a crosscoder against the truth.
    Prints the store path.
    """
    from xcli.data.synth import generate, load_spec

    store = build(SynthStore, options)
    fields = {k: v for k, v in options.items() if k not in vars(store)}
    generate(load_spec(spec, **fields), output, **vars(store))
    click.echo(str(output))
