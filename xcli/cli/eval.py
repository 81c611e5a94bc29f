"""`xc eval`: how good a crosscoder is."""


import click

from xcli import strict_json
from xcli.analysis.config import EvalConfig
from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.files import read_path_argument


@click.command("eval", epilog="""\b
  xc eval xc.safetensors acts.zarr
  xc eval xc.safetensors acts.zarr --splice --windows 128
  xc eval xc.safetensors acts.zarr --model base=./gpt2 --model chat=./gpt2-chat
  xc eval xc.safetensors acts.zarr --model base=./gpt2 --data eval.txt
  xc eval xc.safetensors fresh.zarr --all-rows
  xc eval toy.safetensors toy.zarr --truth toy.zarr.truth.safetensors
  xc train acts.zarr -o xc.safetensors | xc eval - acts.zarr""")
@config_options(EvalConfig)
@common_options
def command(checkpoint, stores, **options):
    """Measure a crosscoder: reconstruction, sparsity, spliced-in loss, planted-feature recovery.

    Prints one JSON object: "rows" ("held-out" or "all"), "tokens", "fvu" per written source,
    "fvu_total" (normalised units, as in training), "l0" (mean nonzero latents per token),
    "l0_quantiles" (0.01 ... 0.99), "dead_fraction" (latents that never fire on these rows;
    BatchTopK uses its threshold).

    With --splice or --model, "splice" holds per model: "ce_clean", "ce_spliced" (that model's
    written sources replaced by the reconstruction during the forward pass, at every position the
    store holds, i.e. not BOS), "ce_ablated" (replaced by zeros), "ce_score" = (ce_ablated -
    ce_spliced) / (ce_ablated - ce_clean), "kl_spliced", "kl_ablated" (KL from the clean
    next-token distribution) and "kl_score" = (kl_ablated - kl_spliced) / kl_ablated, averaged
    over the predictions made at spliced, evaluated positions. The crosscoder encodes the clean
    activations of every model it reads. A score is null when its denominator is 0.
    "ce_increase" = ce_spliced - ce_clean.

    On an aligned store (xc harvest --align) each model runs its own tokenization of the text and
    is spliced only at its positions of the aligned rows; each model also reports "positions"
    (its tokens of the windows), "spliced" and "spliced_fraction". The windows are rebuilt from
    the corpus the harvest recorded, or from --data. A model without a causal LM head (an
    encoder) is only read: its entry has a "note" and no loss.

    CHECKPOINT may be '-' to read its path from stdin.
    """
    from xcli.analysis.evaluate import evaluate

    if checkpoint == "-" and "-" in stores:
        raise BadInput("only one argument can be '-' (read from stdin)")
    config = build(EvalConfig, options, checkpoint=read_path_argument(checkpoint),
                   stores=tuple(read_path_argument(s) for s in stores))
    click.echo(strict_json.dumps(evaluate(config)))
