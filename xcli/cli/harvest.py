"""`xc harvest`: models over a corpus, activations into a store."""

import click

from xcli.cli.params import build, common_options, config_options
from xcli.data.config import HarvestConfig
from xcli.ranks import speaks


@click.command("harvest", epilog="""\b
Examples:
  xc harvest --model gpt2 --layers 6 --data corpus.txt --tokens 10M -o acts.zarr
  xc harvest --model early=EleutherAI/pythia-160m@step100000 --model final=EleutherAI/pythia-160m \\
             --layers 2,4 --site resid_post --site mlp_out --data docs.jsonl -o diff.zarr
  xc harvest ... -o acts.zarr --resume     # continue after Ctrl-C or kill -9; a no-op when done
  torchrun --nproc-per-node 8 -m xcli harvest --model gpt2 --layers 6 --data corpus.txt -o acts.zarr
""")
@common_options
@config_options(HarvestConfig)
def command(**options):
    """Run models over a text corpus and store activations in a Zarr store.

    Every model reads the same windows of token ids; the activations of the chosen layers and sites are
    streamed to STORE in chunks, one row per token. Rows of special tokens (BOS, EOS, ...) and padding are
    left out. The store path is printed on stdout; progress with tokens/s goes to stderr.

    Re-running with the same arguments on a complete store does nothing and prints the path, so a cron
    job can run the same line each time (add --resume to also continue an interrupted run).

    Several GPUs or nodes: start it with torchrun (torchrun --nproc-per-node N -m xcli harvest ...).
    The store's chunks are dealt to the ranks in blocks; each rank computes and writes its own chunks
    of one store, and the finished store is the one a single process writes, row for row. Rank 0
    prints the path. --resume continues with any number of ranks. --data - is not accepted then.
    """
    from xcli.data.harvest import harvest

    path = harvest(build(HarvestConfig, options))
    if path is not None and speaks():
        click.echo(str(path))
