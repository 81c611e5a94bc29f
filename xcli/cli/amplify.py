"""`xc amplify`: sample from an amplified model difference, or with latents steered."""

import sys

import click

from xcli import console, strict_json
from xcli.cli.params import build, common_options, config_options
from xcli.errors import BadInput
from xcli.lm.config import AmplifyConfig, Sampling, SteerConfig

DIFF_OPTIONS = ("before", "after", "alphas")
STEER_OPTIONS = ("model", "checkpoint", "latents", "scales", "clamps")


@click.command("amplify")
@config_options(AmplifyConfig, SteerConfig, only=DIFF_OPTIONS + STEER_OPTIONS, optional=True)
@config_options(AmplifyConfig, only=("prompts",), optional=True)
@click.option("--prompts", "prompts_file", metavar="FILE|-",
              help="A text file with one prompt per line (blank lines skipped); - reads stdin.")
@config_options(Sampling)
@config_options(AmplifyConfig, only=("count", "token_ids", "device", "dtype"))
@common_options
def command(prompts_file, **options):
    """Sample from an amplified model difference, or with crosscoder latents steered.

    \b
    Logit diff amplification (two models, one shared tokenizer):
      xc amplify --before base/ --after chat/ --alpha 0 --alpha 1 --alpha 4 \\
                 --prompts prompts.txt --n-samples 50 --count 'REGEX'
    Latent steering (one model and a checkpoint trained on it):
      xc amplify --model chat=chat/ --checkpoint xc.safetensors --latent 17 \\
                 --scale 0 --scale 8 --prompt 'Tell me about'

    Amplification runs both models on the same prefix and draws each token from
    after + A*(after - before), with a KV cache per model. Each line on stdout is one
    JSON object: {"kind": "completion", "prompt", "completion", "alpha" (or "scale"/"clamp"
    and "latents"), "sample", "seed", "prompt_index", "n_tokens", "finish": "eos"|"length"}.
    With --count, each line also has "match", and one line per value follows:
    {"kind": "count", "count", "alpha", "matches", "n", "rate", "ci95": [low, high]}.
    Nothing is downloaded: models come from local folders or the local Hugging Face cache.
    """
    from xcli.lm import amplify as amp

    def flag(name):
        return "--" + {"alphas": "alpha", "latents": "latent", "scales": "scale", "clamps": "clamp"}.get(name, name)

    prompts = tuple(options.pop("prompts")) + tuple(amp.read_prompts(prompts_file) if prompts_file else ())
    diff_opts = [flag(n) for n in DIFF_OPTIONS if options[n]]
    steer_opts = [flag(n) for n in STEER_OPTIONS if options[n]]
    if diff_opts and steer_opts:
        raise BadInput(f"{diff_opts[0]} (amplification) and {steer_opts[0]} (steering) are separate modes; "
                       f"give --before/--after/--alpha or --model/--checkpoint/--latent")
    sampling = build(Sampling, options)
    if steer_opts:
        if not (options["model"] and options["checkpoint"]):
            raise BadInput("steering needs --model and --checkpoint (and --latent with --scale or --clamp)")
        records = amp.steer(build(SteerConfig, options, prompts=prompts, sampling=sampling))
    else:
        if not (options["before"] and options["after"]):
            raise BadInput("give --before MODEL and --after MODEL with --alpha (amplification), "
                           "or --model/--checkpoint/--latent (steering)")
        records = amp.amplify(build(AmplifyConfig, options, prompts=prompts, sampling=sampling))
    for record in records:
        click.echo(strict_json.dumps(record, ensure_ascii=False))
        if record["kind"] == "count" and not console.settings.quiet:
            print(amp.describe_count(record), file=sys.stderr, flush=True)
