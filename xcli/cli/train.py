"""`xc train`: a crosscoder from activation stores."""

import click

from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.files import read_path_argument
from xcli.ranks import speaks
from xcli.train.config import TrainConfig


@click.command("train", epilog="""\b
  xc train acts.zarr -o xc.safetensors --expansion 16 --k 32 --tokens 50M
  xc train base.zarr chat.zarr -o diff.safetensors --latents 16384 --log metrics.jsonl
  xc train acts.zarr -o sae.safetensors --sources base.resid_post.6 --arch relu --l1 2
  xc train acts.zarr -o tc.safetensors --read base.resid_mid.6 --write base.mlp_out.6
  xc train layers.zarr -o fmx.safetensors --arch fmx --k 64 --ranks 32
  xc train acts.zarr -o m.safetensors --arch matryoshka --latents 4096 --groups 256,1024
  xc harvest ... | xc train - -o xc.safetensors
  xc train acts.zarr -o xc.safetensors --tokens 50M --resume    # after Ctrl-C or kill -9
  torchrun --nproc-per-node 8 -m xcli train acts.zarr -o xc.safetensors --batch-size 32K
  torchrun --nproc-per-node 8 -m xcli train layers.zarr -o xc.safetensors --split-sources""")
@config_options(TrainConfig)
@common_options
def command(stores, **options):
    """Train a sparse crosscoder on activation stores.

    Streams rows from one or more stores (several stores must hold the same
    tokens, e.g. one per model) and writes a safetensors checkpoint; prints its
    path. STORE may be '-' to read the path from stdin.

    Each source is scaled so that its mean squared norm is its width; the scales
    are saved and applied inside encode and decode, so a loaded model takes and
    returns raw activations. The loss is the squared error summed over written
    sources (plus, for relu, l1 * sum_i f_i * sum_s ||W_dec,i^s||; for jumprelu,
    a tanh sparsity penalty and a pre-activation loss) and an AuxK term for dead
    latents (topk, batchtopk).

    Every --checkpoint-every steps, the checkpoint and a training state
    (OUTPUT.state.pt) are written atomically and held-out chunks are evaluated.
    After Ctrl-C (which saves first) or kill -9, rerun with --resume. A NaN or
    inf loss stops the run (exit 1) and keeps the last good checkpoint.

    Several GPUs or nodes: start it with torchrun (torchrun --nproc-per-node N
    -m xcli train ...). The ranks train data-parallel with DDP; --batch-size is
    the batch of one step over all ranks, each rank reads a disjoint share of the
    store's chunks, BatchTopK selects over the whole batch, and rank 0 writes the
    checkpoint, state and log. The weights match a one-process run with the
    same options up to float rounding, and --resume works with any number of
    ranks. With --split-sources the ranks share the sources of one crosscoder
    instead (model parallel), with the same result.
    """
    from xcli.train.loop import train

    if list(stores).count("-") > 1:
        raise BadInput("only one STORE can be '-' (read from stdin)")
    path = train(build(TrainConfig, options, stores=tuple(read_path_argument(s) for s in stores)))
    if speaks():
        click.echo(str(path))
