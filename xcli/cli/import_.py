"""`xc import`: a published dictionary as an xc checkpoint."""

import click

from xcli.cli.params import build, common_options, config_options
from xcli.imports.config import ImportConfig


@click.command("import", epilog="""\b
  xc import model_final.pt -o diff.safetensors --source base:resid_post:13 --source chat:resid_post:13
  xc import crosscoder-hub-folder -o diff.safetensors --source base=google/gemma-2-2b:resid_post:13 \\
      --source chat=google/gemma-2-2b-it:resid_post:13
  xc import .checkpoints/exp/step_100000 -o diff.safetensors
  xc import gemma-scope-2-1b-pt/resid_post/layer_13_width_16k_l0_medium -o sae.safetensors
  xc import params.npz -o sae.safetensors --source google/gemma-2-2b:resid_post:12
  xc import saelens-sae-folder -o sae.safetensors
  xc import model_final.pt -o diff.safetensors --source ... | xc classify - --format table""")
@config_options(ImportConfig)
@common_options
def command(path, **options):
    """Turn a published crosscoder, SAE or transcoder into an xc checkpoint.

    Reads science-of-finetuning/dictionary_learning crosscoders (CrossCoder and
    BatchTopKCrossCoder: a state dict saved with torch.save, loaded weights-only,
    or a hub folder with config.json and model.safetensors), oli-clive-griffin/crosscode
    crosscoders and cross-layer transcoders (a step folder with model.pt and
    model_cfg.yaml), Gemma Scope and Gemma Scope 2 JumpReLU SAEs and transcoders
    (params.npz, or params.safetensors with config.json) and SAELens SAEs and
    transcoders (a folder with cfg.json and sae_weights.safetensors). The result
    encodes and decodes as the original does, so classify, eval, export, amplify
    and track work on it unchanged; prints its path.

    Input normalisation is folded into the weights where that is exact (a per-layer
    scale becomes the source's input scale, a mean folds into the biases), and
    thresholds are kept (BatchTopK's one threshold, JumpReLU's per latent). What
    cannot be expressed exactly is refused with one line: per-token normalisation,
    per-layer (DECOUPLED) BatchTopK, batch-dependent BatchTopK without a threshold
    (crosscode), ranks other than xc's, skip transcoders, Gemma Scope 2's
    multi-layer crosscoders (their layout is not public). The checkpoint's metadata
    records the format and how each field was mapped ("imported").

    dictionary_learning crosscoders do not record which model and layer each of their
    layers is: give --source once per layer, in their order. SAELens records it in
    cfg.json, crosscode in the experiment_config.yaml above its step folders, Gemma
    Scope 2 in config.json; --source overrides them (Gemma Scope's params.npz: one
    --source for an SAE, two for a transcoder).
    """
    from xcli.imports import import_dictionary

    click.echo(str(import_dictionary(build(ImportConfig, options, path=path))))
