"""The `xc` command line: parse arguments, call the library, print the result.

Logic lives in library modules (xcli.store, xcli.harvest, ...). A command here
turns its options into a library call and prints what was produced: a path or
JSON lines on stdout. Errors are translated once, in `XcGroup.main`.
"""

import functools
import json
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
not_built("classify", "label latents as shared, exclusive or mixed")
not_built("export", "Neuronpedia export of feature dashboards")


@cli.command("amplify")
@click.option("--before", metavar="MODEL", help="Model before the change (e.g. the base model): a local folder, "
              "or a hub id already in the local Hugging Face cache, optionally ID@REVISION. Never downloaded.")
@click.option("--after", metavar="MODEL", help="Model after the change (e.g. the fine-tune); same forms as "
              "--before. Must share the tokenizer (vocabularies are compared). A completion ends at an EOS "
              "id of either model's generation config or of the tokenizer.")
@click.option("--alpha", "alphas", type=float, multiple=True, metavar="A",
              help="Amplification factor: sample from after + A*(after - before). Repeat for a sweep. "
              "0 reproduces --after and -1 reproduces --before (keep them as controls).")
@click.option("--model", metavar="[ALIAS=]MODEL", help="Steering: the model to steer. The checkpoint's sources "
              "whose \"model\" field equals ALIAS (or, without an alias, the path or id as written, or the same "
              "folder) are steered at their sites.")
@click.option("--checkpoint", metavar="X.safetensors", help="Steering: an xc crosscoder checkpoint.")
@click.option("--latent", "latents", type=int, multiple=True, metavar="I",
              help="Steering: latent index to steer; repeat to steer several latents at once.")
@click.option("--scale", "scales", type=float, multiple=True, metavar="S",
              help="Steering: add S times each latent's decoder row (raw units, i.e. divided by the "
              "source's input_scale) at every position of each site. Repeat for a sweep; 0 = unsteered.")
@click.option("--clamp", "clamps", type=float, multiple=True, metavar="V",
              help="Steering: hold each latent's activation at V: encode the site activations, then add "
              "(V - f_I) times its decoder row (raw units). Needs every read source in this model, read "
              "no later than the first written one. Repeat for a sweep.")
@click.option("--prompt", "prompt_texts", multiple=True, metavar="TEXT", help="A prompt; repeatable.")
@click.option("--prompts", "prompts_file", metavar="FILE|-",
              help="A text file with one prompt per line (blank lines skipped); - reads stdin.")
@click.option("--n-samples", type=int, default=1, show_default=True, help="Completions per prompt and value.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True,
              help="Tokens generated per completion at most (a completion also ends at EOS).")
@click.option("--temperature", type=float, default=1.0, show_default=True,
              help="Sampling temperature; 0 is greedy decoding.")
@click.option("--top-p", type=float, default=1.0, show_default=True,
              help="Nucleus sampling: keep the most likely tokens whose mass first reaches P.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Sample S of prompt I uses a random stream fixed by (seed, I, S): the same for every "
              "alpha/scale/clamp value and for any --batch-size.")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Completions decoded together (left-padded).")
@click.option("--count", metavar="REGEX", help="Search each completion for REGEX (Python syntax). Adds "
              "\"match\" to each line, then one summary line per value with matches, n, rate and a 95%% "
              "Wilson interval; the same summary goes to stderr.")
@click.option("--token-ids", is_flag=True, help="Also print the generated token ids (EOS included).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Model weights; auto is bfloat16 on a GPU that supports it, else float32. "
              "Logits are combined in float32.")
@common_options
def amplify_command(before, after, alphas, model, checkpoint, latents, scales, clamps, prompt_texts,
                    prompts_file, n_samples, max_new_tokens, temperature, top_p, seed, batch_size, count,
                    token_ids, device, dtype):
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
    from xcli import amplify as amp

    prompts = list(prompt_texts) + (amp.read_prompts(prompts_file) if prompts_file else [])
    diff_opts = [n for n, v in (("--before", before), ("--after", after), ("--alpha", alphas)) if v]
    steer_opts = [n for n, v in (("--model", model), ("--checkpoint", checkpoint), ("--latent", latents),
                                 ("--scale", scales), ("--clamp", clamps)) if v]
    if diff_opts and steer_opts:
        raise BadInput(f"{diff_opts[0]} (amplification) and {steer_opts[0]} (steering) are separate modes; "
                       f"give --before/--after/--alpha or --model/--checkpoint/--latent")
    sampling = amp.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                            n_samples=n_samples, batch_size=batch_size)
    common = dict(prompts=tuple(prompts), sampling=sampling, count=count, device=device, dtype=dtype,
                  token_ids=token_ids)
    if steer_opts:
        if not (model and checkpoint):
            raise BadInput("steering needs --model and --checkpoint (and --latent with --scale or --clamp)")
        records = amp.steer(amp.SteerConfig(model=model, checkpoint=checkpoint, latents=tuple(latents),
                                            scales=tuple(scales), clamps=tuple(clamps), **common))
    else:
        if not (before and after):
            raise BadInput("give --before MODEL and --after MODEL with --alpha (amplification), "
                           "or --model/--checkpoint/--latent (steering)")
        records = amp.amplify(amp.AmplifyConfig(before=before, after=after, alphas=tuple(alphas), **common))
    for record in records:
        click.echo(json.dumps(record, ensure_ascii=False))
        if record["kind"] == "count" and not console.settings.quiet:
            print(amp.describe_count(record), file=sys.stderr, flush=True)


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
