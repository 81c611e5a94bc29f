"""The `xc` command line: parse arguments, call the library, print the result.

Logic lives in library modules (xcli.store, xcli.harvest, ...). A command here
turns its options into a library call and prints what was produced: a path or
JSON lines on stdout. Errors are translated once, in `XcGroup.main`.
"""

import json
import os
import sys
import traceback

import click

from xcli import console
from xcli.errors import BadInput, XcError
from xcli.files import read_path_argument
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


def device_option(what: str):
    """--device, one meaning for every command that runs torch (checked by xcli.models.resolve_device)."""
    return click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
                        help=f"Where {what}: auto picks the first CUDA GPU if there is one, else the CPU.")


def compute_options(what: str, dtypes: tuple[str, ...], dtype_default: str, dtype_help: str):
    """--device and --dtype; the dtype choices and what auto means differ by command."""
    def decorate(f):
        f = click.option("--dtype", type=click.Choice(dtypes), default=dtype_default, show_default=True,
                         help=dtype_help)(f)
        return device_option(what)(f)
    return decorate


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


@cli.command("export")
@click.argument("checkpoint", required=False, metavar="[CHECKPOINT|-]")
@click.option("--store", metavar="STORE", help="Activation store to read the dashboards from (xc harvest output). "
              "Needed for --format neuronpedia.")
@click.option("-o", "--output", metavar="DIR", help="Folder to write. Refused if it exists, unless --resume or "
              "--overwrite.")
@click.option("--format", "fmt", type=click.Choice(["neuronpedia", "saelens"]), default="neuronpedia",
              show_default=True, help="neuronpedia: the v1 export layout (one Neuronpedia source per written "
              "(model, layer), same feature indices in all). saelens: one SAELens SAE folder per source slice.")
@click.option("--model-id", "model_ids", multiple=True, metavar="[MODEL=]ID",
              help="Neuronpedia model id of a model of the crosscoder (e.g. base=gemma-2-2b); repeat per model. "
                   "Default: the model's name, lowercased.")
@click.option("--model-path", "model_paths", multiple=True, metavar="[MODEL=]PATH",
              help="Where to read a model's config and unembedding (offline) for the logit lens. Default: the "
                   "path or hub id recorded in the store (hub ids must be in the local Hugging Face cache).")
@click.option("--tokenizer", metavar="PATH", help="Tokenizer for token strings. Default: the one recorded in the "
              "store, else the first model's.")
@click.option("--set-name", metavar="NAME", help="Neuronpedia source set; source ids are LAYER-NAME. "
              "Default: xc-{latents}, e.g. xc-16k.")
@click.option("--features", default="all", show_default=True, metavar="SPEC",
              help="Latents to export: all, 7, 0-99 (inclusive) or a comma list such as 0-9,42.")
@click.option("--top-k", type=int, default=20, show_default=True,
              help="Top activating examples per feature (plus 5 samples in each of 5 activation intervals).")
@click.option("--batch-size", type=int, default=128, show_default=True,
              help="Features per batch-N.jsonl.gz file (keep files per folder under 1000).")
@click.option("--window", type=int, default=64, show_default=True,
              help="Tokens shown per example: the example token, up to 3/4 of the window before it and the rest "
                   "after, never crossing into another sequence.")
@click.option("--classes", type=click.Path(dir_okay=False), metavar="CLASSIFY.jsonl",
              help="Output of `xc classify`: each latent's class and statistics go to xc-latents.jsonl and the "
                   "class counts to Source.notes.")
@click.option("--vectors", is_flag=True, help="Include each feature's decoder direction (raw units) as its "
              "steering vector. Large: d_model numbers per feature and source.")
@click.option("--creator-id", default="clkht01d40000jv08hvalcvly", show_default=True,
              help="Neuronpedia user id written as creatorId. Activations are shown only for ids listed in the "
                   "instance's PUBLIC_ACTIVATIONS_USER_IDS; the default is one of them.")
@click.option("--creator-name", default="xc", show_default=True, help="creatorName of the release and source set.")
@device_option("the crosscoder runs over the store")
@click.option("--resume", is_flag=True, help="Continue an unfinished export in DIR: finished batches are skipped.")
@click.option("--overwrite", is_flag=True, help="Replace DIR if it exists.")
@click.option("--check", "check_dir", metavar="DIR", help="Validate the export in DIR against Neuronpedia's "
              "importer rules instead of exporting; print a JSON summary, or exit 2 listing the problems.")
@common_options
def export_command(checkpoint, store, output, fmt, model_ids, model_paths, tokenizer, set_name, features, top_k,
                   batch_size, window, classes, vectors, creator_id, creator_name, device, resume, overwrite,
                   check_dir):
    """Export a crosscoder's feature dashboards for Neuronpedia, or its slices as SAELens SAEs.

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
    """
    from xcli.export import ExportConfig, export
    from xcli.neuronpedia import ExportProblems, check_export

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
        click.echo(json.dumps(summary))
        return
    if checkpoint is None:
        raise click.UsageError("missing CHECKPOINT (or pass --check DIR)")
    if output is None:
        raise click.UsageError("missing -o DIR")
    config = ExportConfig(checkpoint=read_path_argument(checkpoint), output=output, store=store, format=fmt,
                          model_ids=model_ids, model_paths=model_paths, tokenizer=tokenizer, set_name=set_name,
                          features=features, top_k=top_k, batch_size=batch_size, window=window, classes=classes,
                          vectors=vectors, creator_id=creator_id, creator_name=creator_name, device=device,
                          resume=resume, overwrite=overwrite)
    click.echo(str(export(config)))


def _pair(value: str | None, option: str) -> tuple[str, str] | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(parts):
        raise BadInput(f"{option} {value!r} must be two comma-separated values, e.g. A,B")
    return parts[0], parts[1]


def _band(value: str) -> tuple[float, float]:
    low, high = _pair(value, "--shared-band")
    try:
        return float(low), float(high)
    except ValueError:
        raise BadInput(f"--shared-band {value!r} must be two numbers LOW,HIGH, e.g. 0.3,0.7") from None


@cli.command("classify")
@click.argument("checkpoint")
@click.option("--store", metavar="STORE", help="Activation store (a Zarr folder) holding the checkpoint's "
              "sources: adds frequency, mean and max activation, Latent Scaling and, for cross-layer "
              "crosscoders, functional coherence.")
@click.option("--models", metavar="A,B", help="The two models to compare: r, delta norm and cosine are "
              "oriented B over A (1 = only B). Default: the two models in checkpoint order.")
@click.option("--exclusive-share", type=float, default=0.9, show_default=True,
              help="Exclusive to a model when it holds at least this share of the latent's decoder norm "
              "(two models: r <= 0.1 or r >= 0.9).")
@click.option("--shared-band", default="0.3,0.7", show_default=True, metavar="LOW,HIGH",
              help="Shared when LOW <= r <= HIGH; with more than two models, when every model holds at "
              "least 2*LOW/n of the norm. Anything neither shared nor exclusive is 'mixed'.")
@click.option("--dead-frequency", type=float, default=0.0, show_default=True,
              help="With --store: dead when the latent fires on at most this fraction of tokens. "
              "Without a store only latents with no decoder norm are dead.")
@click.option("--nu-epsilon", type=float, default=0.2, show_default=True,
              help="Latent Scaling: an exclusive latent with nu_epsilon at or above this is flagged "
              "'shrinkage' (the other model carries its direction in its reconstruction error).")
@click.option("--nu-r", type=float, default=0.5, show_default=True,
              help="Latent Scaling: an exclusive latent with nu_r at or above this is flagged "
              "'decoupling' (other latents rebuild its direction in the other model).")
@click.option("--span-share", type=float, default=0.1, show_default=True,
              help="Cross-layer: a layer is in a latent's span when it holds at least this share of "
              "the latent's decoder norm.")
@click.option("--max-tokens", type=int, help="With --store: use only the first N tokens.")
@device_option("the store pass runs")
@click.option("--plot", "plot_dir", metavar="DIR", help="Also draw figures into DIR (created if missing): "
              "relative_norm.png, cosine_shared.png, layer_profiles.png (cross-layer), latent_scaling.png "
              "(with --store). Needs matplotlib: pip install 'xcli[plot]'.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv", "table"]), default="jsonl",
              show_default=True, help="Rows as JSON lines, CSV (nested fields as field.key columns) or "
                                      "an aligned text table of the main columns.")
@click.option("-o", "--output", metavar="FILE", help="Write the rows to FILE (atomically) and print its "
              "path, instead of writing the rows to stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file or figures.")
@common_options
def classify_command(checkpoint, store, models, exclusive_share, shared_band, dead_frequency, nu_epsilon, nu_r,
                     span_share, max_tokens, device, plot_dir, fmt, output, overwrite):
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
    from xcli import classify as cl
    from xcli.crosscoder import load
    from xcli.models import resolve_device
    from xcli.files import atomic_path, check_output, read_path_argument
    from xcli.store import open_store

    config = cl.ClassifyConfig(
        models=_pair(models, "--models"), exclusive_share=exclusive_share, shared_band=_band(shared_band),
        dead_frequency=dead_frequency, nu_epsilon=nu_epsilon, nu_r=nu_r, span_share=span_share,
        max_tokens=max_tokens, device=str(resolve_device(device)))
    if max_tokens is not None and not store:
        raise BadInput("--max-tokens applies to the store pass; give --store STORE as well")
    if output:
        check_output(output, overwrite=overwrite)
    if plot_dir:
        from xcli import plots

        plots.require_matplotlib()
        plots.check_plot_dir(plot_dir, overwrite)
    model = load(read_path_argument(checkpoint))
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
        for path in plots.write_plots(result, plot_dir, overwrite):
            console.info(f"wrote {path}")
    if not console.settings.quiet:
        cl.print_summary(result, sys.stderr)
    if output:
        click.echo(output)


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
@compute_options("the models run", ("auto", "float32", "bfloat16", "float16"), "auto",
                 "Model weights; auto is bfloat16 on a GPU that supports it, else float32. "
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


# Literal copies of xcli.crosscoder.ARCHS and xcli.train.DTYPES, so that `xc --help`
# does not import torch; tests/test_train.py checks that they agree.
ARCHS, DTYPES = ("relu", "topk", "batchtopk"), ("auto", "float32", "bfloat16")
# The same for xcli.fmx.FMX_ARCHS and FACTORIZATIONS (checked in tests/test_fmx.py).
FMX_ARCHS, FACTORIZATIONS = ("fmx", "fmx-topk", "fmx-relu"), ("tr", "cp")


class Count(click.ParamType):
    """A whole number that may carry a K, M or B suffix (10M = 10,000,000)."""

    name = "N"
    SUFFIXES = {"k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().replace("_", "").lower()
        factor = self.SUFFIXES.get(text[-1:], 1)
        try:
            number = float(text[:-1] if factor > 1 else text) * factor
        except ValueError:
            self.fail(f"{value!r} is not a count (e.g. 4096, 50K, 10M)", param, ctx)
        if number != int(number):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(number)


def rank_list(ctx, param, value):
    """'8,8,8' -> (8, 8, 8)."""
    if value is None:
        return None
    try:
        return tuple(int(r) for r in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of whole numbers (e.g. 16 or 16,8,16)")


def source_list(ctx, param, value):
    """'a,b' -> ("a", "b"); an empty value stays an empty tuple, which the config rejects."""
    if value is None:
        return None
    return tuple(name.strip() for name in value.split(",") if name.strip())


@cli.command("train", epilog="""\b
  xc train acts.zarr -o xc.safetensors --expansion 16 --k 32 --tokens 50M
  xc train base.zarr chat.zarr -o diff.safetensors --latents 16384 --log metrics.jsonl
  xc train acts.zarr -o sae.safetensors --sources base.resid_post.6 --arch relu --l1 2
  xc train acts.zarr -o tc.safetensors --read base.resid_mid.6 --write base.mlp_out.6
  xc train layers.zarr -o fmx.safetensors --arch fmx --k 64 --ranks 32
  xc harvest ... | xc train - -o xc.safetensors
  xc train acts.zarr -o xc.safetensors --tokens 50M --resume    # after Ctrl-C or kill -9
  torchrun --nproc-per-node 8 -m xcli train acts.zarr -o xc.safetensors --batch-size 32K
  torchrun --nproc-per-node 8 -m xcli train layers.zarr -o xc.safetensors --split-sources""")
@click.argument("stores", nargs=-1, required=True, metavar="STORE...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint to write (.safetensors; format in xc-checkpoint(5)).")
@click.option("--sources", callback=source_list, metavar="NAMES",
              help="Comma-separated sources to train on. Default: every source of the stores, or those "
                   "--read and --write name.")
@click.option("--read", callback=source_list, metavar="NAMES",
              help="Comma-separated sources the encoder reads. Default: all training sources.")
@click.option("--write", callback=source_list, metavar="NAMES",
              help="Comma-separated sources the decoder reconstructs. Default: all training sources. "
                   "Reading layer n and writing layer n+1 makes a transcoder.")
@click.option("--arch", type=click.Choice(ARCHS + FMX_ARCHS), default="batchtopk", show_default=True,
              help="relu: L1 penalty weighted by decoder norms; topk: the k best latents per token; "
                   "batchtopk: the k*B best per batch, with a learned threshold at inference. "
                   "fmx: a factorized masked crosscoder (fmxcoder) over layers of one model, selecting with "
                   "batchtopk; fmx-topk and fmx-relu select with topk and relu. See --factorization, --ranks, "
                   "--mask-prob.")
@click.option("--latents", type=int, help="Dictionary size F.")
@click.option("--expansion", type=float,
              help="Dictionary size as a multiple of the widest source's width (default 16).")
@click.option("--k", type=int, help="Active latents per token, for topk and batchtopk (default 32).")
@click.option("--l1", type=float, help="Sparsity penalty lambda for relu (default 2.0); it warms up over the "
                                       "first 5% of steps.")
@click.option("--factorization", type=click.Choice(FACTORIZATIONS),
              help="fmx: how encoder and decoder (layer x activation x latent) tensors are factorized: tr, a "
                   "tensor ring, W[l,a,i] = trace(G_layer[l] G_act[a] G_latent[i]); cp, a CP decomposition, "
                   "W[l,a,i] = sum_r layer[l,r] act[a,r] latent[i,r]. Default: tr.")
@click.option("--ranks", callback=rank_list, metavar="R[,R2,R3]",
              help="fmx: the ranks, R1,R2,R3 for tr (one number sets all three) or R for cp. Default: "
                   "ceil(sqrt(L*d)) each for tr and L*d for cp (L layers of width d), so the joint rank is not "
                   "limited; lower ranks share more across layers but reconstruct worse.")
@click.option("--mask-prob", type=float,
              help="Stochastic layer masking: in training, zero each read source's encoder input per token with "
                   "this probability, while the loss still reconstructs the clean activations. Default: 0.05 "
                   "for fmx archs, 0 otherwise.")
@click.option("--batch-size", type=Count(), default=4096, show_default=True, help="Tokens per step.")
@click.option("--tokens", type=Count(),
              help="Training tokens, e.g. 50M (rounded up to whole batches; several epochs when it exceeds "
                   "the store). Default: one pass over the training rows.")
@click.option("--steps", type=int, help="Training steps, instead of --tokens.")
@click.option("--lr", type=float, help="Peak Adam learning rate. Default: 2e-4 / sqrt(F / 16384).")
@click.option("--warmup", type=int, help="Steps of linear learning-rate warmup. Default: min(1000, 5% of steps).")
@click.option("--decay", type=float, default=0.2, show_default=True,
              help="Fraction of the steps, at the end, over which the learning rate falls linearly to zero.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Maximum gradient norm (0: no clipping).")
@click.option("--k-aux", type=int,
              help="Dead latents used per token by the AuxK loss (topk, batchtopk). Default: half the summed "
                   "width of the written sources; 0 turns AuxK off.")
@click.option("--dead-tokens", type=Count(), default="10M", show_default=True,
              help="A latent that has not fired for this many training tokens counts as dead.")
@click.option("--eval-fraction", type=float, default=0.01, show_default=True,
              help="Fraction of the store's chunks held out to report FVU, L0 and dead latents on "
                   "(at least one chunk when above 0; 0: no evaluation).")
@click.option("--shuffle-buffer", type=Count(), default=65536, show_default=True,
              help="Rows shuffled together in memory (whole chunks); memory use grows with it, not with the store.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initialisation and the data order.")
@compute_options("training runs", DTYPES, "auto",
                 "Compute dtype of the encoder matmul; weights and Adam state stay float32. auto: bfloat16 "
                 "on CUDA GPUs with bf16 and on CPUs with AMX or AVX512-BF16, else float32. The choice is "
                 "recorded, and --resume must use the same one.")
@click.option("--log", "--log-file", "log", type=click.Path(dir_okay=False),
              help="Write metrics as JSON lines: loss parts, FVU per source, L0, dead fraction, lr, tokens/s; "
                   "and held-out evaluations. Under torchrun, spell it --log-file (torchrun claims --log).")
@click.option("--log-every", type=int, default=100, show_default=True, help="Steps between metrics lines.")
@click.option("--checkpoint-every", type=int, default=1000, show_default=True,
              help="Steps between checkpoints (with evaluation, and the training state that --resume uses).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last checkpoint (same options); ends with the same "
                   "weights as an uninterrupted run. Does nothing if the checkpoint is complete.")
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint, log and training state.")
@click.option("--allow-incomplete", is_flag=True, help="Train on a store whose harvest has not finished.")
@click.option("--split-sources", is_flag=True,
              help="Under torchrun: split the sources over the ranks instead of training data-parallel, for a "
                   "crosscoder too big for one GPU (many layers). Each rank holds the encoder, decoder and Adam "
                   "state of a contiguous group of sources (balanced by width), reads only their columns of the "
                   "store and trains on every batch; the ranks exchange the B x F encoder sums and the latent "
                   "gradients. topk and batchtopk only; at most as many ranks as sources. The checkpoint and "
                   "training state are the usual ones (rank 0 needs host memory for the whole crosscoder). "
                   "No effect in one process.")
@common_options
def train_command(stores, **options):
    """Train a sparse crosscoder on activation stores.

    Streams rows from one or more stores (several stores must hold the same
    tokens, e.g. one per model) and writes a safetensors checkpoint; prints its
    path. STORE may be '-' to read the path from stdin.

    Each source is scaled so that its mean squared norm is its width; the scales
    are saved and applied inside encode and decode, so a loaded model takes and
    returns raw activations. The loss is the squared error summed over written
    sources (plus, for relu, l1 * sum_i f_i * sum_s ||W_dec,i^s||) and an AuxK
    term for dead latents.

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
    from xcli.files import read_path_argument
    from xcli.train import TrainConfig, train

    if list(stores).count("-") > 1:
        raise BadInput("only one STORE can be '-' (read from stdin)")
    paths = tuple(read_path_argument(s) for s in stores)
    path = train(TrainConfig(stores=paths, **options))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, only rank 0 prints the path
        click.echo(str(path))


# Literal copies of xcli.store's codecs and defaults, so that `xc --help` does not import zarr;
# tests/test_harvest.py checks that they agree.
STORE_CODECS, STORE_CHUNK_ROWS, STORE_CODEC = ("none", "zstd", "blosc-lz4"), 4096, "none"


@cli.command("harvest", epilog="""\b
Examples:
  xc harvest --model gpt2 --layers 6 --data corpus.txt --tokens 10M -o acts.zarr
  xc harvest --model early=EleutherAI/pythia-160m@step100000 --model final=EleutherAI/pythia-160m \\
             --layers 2,4 --site resid_post --site mlp_out --data docs.jsonl -o diff.zarr
  xc harvest ... -o acts.zarr --resume     # continue after Ctrl-C or kill -9; a no-op when done
  torchrun --nproc-per-node 8 -m xcli harvest --model gpt2 --layers 6 --data corpus.txt -o acts.zarr
""")
@common_options
@click.option("-m", "--model", "models", multiple=True, required=True, metavar="[ALIAS=]ID_OR_PATH[@REVISION]",
              help="A Hugging Face model: a local folder or a hub id already in the local cache (xc never "
                   "downloads). Repeat for several models (model diffing): all see the same tokens and must "
                   "share one vocabulary. ALIAS names the model in the store (default: the folder name).")
@click.option("-l", "--layers", metavar="SPEC",
              help="Blocks to read, counted from 0: 6, 4-8 (inclusive), 0,3,6 or all. Needed by the named "
                   "sites and by module paths containing {layer}.")
@click.option("-s", "--site", "sites", multiple=True, default=("resid_post",), show_default=True,
              metavar="SITE",
              help="What to read at each layer, repeatable: resid_post (output of block L; for the last "
                   "block this is before the final norm), resid_pre (input of block L), attn_out or mlp_out "
                   "(what the attention or MLP sublayer adds to the residual stream), or a MODULE.PATH "
                   "whose output is read, e.g. h.3.mlp.c_fc; {layer} in a path is replaced by each layer.")
@click.option("-d", "--data", required=True, metavar="FILE|DIR|NAME|-",
              help="The corpus: a text file with one document per line, a .jsonl file (see --text-field), a "
                   "folder of .txt files (one document each), - for stdin, or a Hugging Face dataset name "
                   "from the local cache when the 'datasets' package is installed.")
@click.option("--text-field", default="text", show_default=True,
              help="Field holding the text in .jsonl records and dataset rows.")
@click.option("--split", default="train", show_default=True, help="Dataset split, for dataset names.")
@click.option("-c", "--context-length", type=int, metavar="N",
              help="Tokens per window, special tokens included. Documents are packed into windows with "
                   "EOS between them; longer ones continue in the next window. Default: 1024, or less if a "
                   "model accepts fewer positions.")
@click.option("-t", "--tokens", type=Count(), metavar="N",
              help="Stop after storing N token rows (500k, 10M and 1G are accepted). Default: the whole "
                   "corpus. A corpus with fewer tokens is stored whole, with a warning.")
@click.option("-b", "--batch-size", type=int, default=8, show_default=True, metavar="N",
              help="Windows per forward pass.")
@compute_options("the models run", ("auto", "float32", "float16", "bfloat16"), "auto",
                 "Dtype the models compute in; auto keeps the dtype they were saved in.")
@click.option("--store-dtype", type=click.Choice(["auto", "float16", "bfloat16", "float32"]), default="auto",
              show_default=True,
              help="Dtype of the stored activations. auto: bfloat16 when a model computes in bfloat16 "
                   "(stored losslessly as its bits), else float16. Values beyond the float16 range stop the "
                   "run with an error; they are never stored as inf.")
@click.option("--keep-special-tokens", is_flag=True,
              help="Also store rows of BOS, EOS and other special tokens (their large norms can dominate "
                   "training). Padding is never stored.")
@click.option("--chunk-rows", type=int, default=STORE_CHUNK_ROWS, show_default=True, metavar="N",
              help="Token rows per Zarr chunk: the unit of reading, writing and resuming.")
@click.option("--codec", type=click.Choice(STORE_CODECS), default=STORE_CODEC, show_default=True,
              help="Chunk compression. Activations compress little (about 1.1x for float16); zstd saves "
                   "some disk at a large cost in read speed.")
@click.option("-o", "--output", required=True, type=click.Path(), metavar="STORE",
              help="The activation store to write (a folder, see xc-store(5)).")
@click.option("--resume", is_flag=True,
              help="Continue an incomplete store written with the same arguments, or start it if it is "
                   "missing. The result equals an uninterrupted run.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def harvest_command(models, layers, sites, data, text_field, split, context_length, tokens, batch_size, dtype,
                    store_dtype, device, keep_special_tokens, chunk_rows, codec, output, resume, overwrite):
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
    from xcli.harvest import HarvestConfig, ReportedByRankZero, for_this_rank, harvest

    try:
        try:
            config = HarvestConfig(models=tuple(models), data=data, output=output, layers=layers,
                                   sites=tuple(sites), context_length=context_length, tokens=tokens,
                                   batch_size=batch_size, dtype=dtype, store_dtype=store_dtype, device=device,
                                   text_field=text_field, split=split, keep_special_tokens=keep_special_tokens,
                                   chunk_rows=chunk_rows, codec=codec, resume=resume, overwrite=overwrite)
        except XcError as e:  # under torchrun every rank sees the same arguments: rank 0 says what is wrong
            raise for_this_rank(e) from None
        path = harvest(config)
    except ReportedByRankZero as e:
        raise click.exceptions.Exit(e.exit_code) from None
    if path is not None:  # rank 0 prints the store under torchrun
        click.echo(str(path))


@cli.command("info")
@common_options
@click.argument("store", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the summary.")
def info_command(store, as_json):
    """Summarise an activation store: sources, widths, tokens, dtype, size and completeness.

    STORE may be - to read the path from stdin, e.g. `xc harvest ... | xc info -`.
    """
    from xcli.store import open_store

    summary = open_store(read_path_argument(store)).summary()
    if as_json:
        click.echo(json.dumps(summary))
        return
    state = "complete" if summary["complete"] else "INCOMPLETE (resume with xc harvest ... --resume)"
    click.echo(f"{summary['path']}: {summary['n_tokens']:,} tokens, {state}")
    click.echo(f"  dtype {summary['dtype']}, chunks of {summary['chunk_rows']} rows, codec {summary['codec']}, "
               f"{summary['bytes_on_disk'] / 1e6:,.1f} MB on disk")
    if summary["context_length"] or summary["dataset"]:
        click.echo(f"  context {summary['context_length']}, data {summary['dataset']}")
    width = max(len(s["name"]) for s in summary["sources"])
    click.echo(f"  {'source':<{width}}  {'model':<12} {'site':<12} {'layer':>5} {'d':>6}")
    for s in summary["sources"]:
        layer = "-" if s["layer"] is None else s["layer"]
        click.echo(f"  {s['name']:<{width}}  {s['model']:<12} {s['site']:<12} {layer:>5} {s['d']:>6}")


@cli.command("eval", epilog="""\b
  xc eval xc.safetensors acts.zarr
  xc eval xc.safetensors acts.zarr --splice --windows 128
  xc eval xc.safetensors acts.zarr --model base=./gpt2 --model chat=./gpt2-chat
  xc eval xc.safetensors acts.zarr --model base=./gpt2 --data eval.txt
  xc eval xc.safetensors fresh.zarr --all-rows
  xc eval toy.safetensors toy.zarr --truth toy.zarr.truth.safetensors
  xc train acts.zarr -o xc.safetensors | xc eval - acts.zarr""")
@click.argument("checkpoint", metavar="CHECKPOINT|-")
@click.argument("stores", nargs=-1, required=True, metavar="STORE...")
@click.option("--all-rows", is_flag=True, help="Evaluate on every row of the stores. Default: the rows `xc train` "
              "held out (its --eval-fraction chunks); that needs the stores it was trained on.")
@click.option("--truth", type=click.Path(dir_okay=False), metavar="TRUTH",
              help="Planted truth of a synthetic store (STORE.truth.safetensors, from `xc synth`): adds the mean "
                   "max cosine similarity, the fraction of planted features recovered, both by kind and by layer "
                   "span, the reverse MMCS over latents that fire, and (two or more models) how often `xc classify` "
                   "gives a feature's best latent the class of the planted feature.")
@click.option("--threshold", type=float, default=0.9, show_default=True,
              help="With --truth: a planted feature is recovered when a latent's decoder has a cosine above this "
                   "(all sources concatenated, raw units).")
@click.option("--splice", is_flag=True, help="Measure the spliced-in next-token loss of each model, with the models "
              "the store's harvest recorded (local folders or the local Hugging Face cache; never downloaded).")
@click.option("--model", "models", multiple=True, metavar="ALIAS=PATH",
              help="A model to splice into (implies --splice); ALIAS is the model name in the checkpoint's sources. "
                   "Repeat for each model. Every model the crosscoder reads from is needed.")
@click.option("--data", type=click.Path(dir_okay=False), metavar="TEXT",
              help="Measure the spliced-in loss on this text file (one sequence per line) instead of the store's "
                   "token windows.")
@click.option("--windows", type=int, default=64, show_default=True,
              help="Token windows (sequences) the spliced-in loss is measured on, at most; spread evenly over the "
                   "evaluated rows.")
@click.option("--window-batch", type=int, default=4, show_default=True,
              help="Windows per forward pass. Each holds B x T x vocabulary log-probabilities three times: lower "
                   "it for large vocabularies.")
@click.option("--batch-size", type=Count(), default=4096, show_default=True,
              help="Rows per batch for FVU, L0 and dead latents.")
@compute_options("the crosscoder and the models run", ("auto", "float32", "bfloat16", "float16"), "auto",
                 "Language-model weights for the spliced-in loss; auto is bfloat16 on a GPU that supports it, "
                 "else float32. The crosscoder runs in float32.")
@click.option("--allow-incomplete", is_flag=True, help="Accept a store whose harvest has not finished.")
@common_options
def eval_command(checkpoint, stores, all_rows, truth, threshold, splice, models, data, windows, window_batch,
                 batch_size, device, dtype, allow_incomplete):
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

    CHECKPOINT may be '-' to read its path from stdin.
    """
    from xcli.evaluate import EvalConfig, evaluate

    if checkpoint == "-" and "-" in stores:
        raise BadInput("only one argument can be '-' (read from stdin)")
    stores = tuple(read_path_argument(s) for s in stores)
    report = evaluate(EvalConfig(checkpoint=read_path_argument(checkpoint), stores=stores, all_rows=all_rows,
                                 truth=truth, threshold=threshold, models=tuple(models), splice=splice, data=data,
                                 windows=windows, window_batch=window_batch, batch_size=batch_size, device=device,
                                 dtype=dtype, allow_incomplete=allow_incomplete))
    click.echo(json.dumps(report))


def number_pair(separator: str, cast):
    """'1-4' or '0.5,1.5' -> a tuple of two numbers."""
    def convert(ctx, param, value):
        if value is None:
            return None
        parts = value.split(separator)
        try:
            if len(parts) != 2:
                raise ValueError
            return tuple(cast(p) for p in parts)
        except ValueError:
            raise click.BadParameter(f"{value!r} is not two numbers written {param.metavar}") from None
    return convert


@cli.command("synth", epilog="""\b
  xc synth diff -o toy.zarr                       # a preset: diff, layers or diff-layers
  xc synth -o toy.zarr --models base,chat --shared 64 --exclusive 16 --scaled 8 --scale 0.3
  xc synth -o deep.zarr --models m --layers 8 --span 1-8 --drift 10 --exclusive 0
  xc synth spec.json -o toy.zarr --seed 3 --tokens 1M
  xc synth diff -o toy.zarr | xc train - -o toy.safetensors --k 4""")
@click.argument("spec", required=False, metavar="[PRESET|SPEC.json]")
@click.option("-o", "--output", required=True, type=click.Path(), metavar="STORE",
              help="The store to write; the truth goes beside it as STORE.truth.safetensors.")
@click.option("--models", callback=source_list, metavar="NAMES",
              help="Comma-separated model names (default a,b); sources are MODEL.synthetic.LAYER.")
@click.option("--layers", type=int, help="Layers per model (default 1).")
@click.option("--width", type=int, help="Width of every source (default 32).")
@click.option("--shared", type=int, help="Features present in every model with equal norm (default 48).")
@click.option("--exclusive", type=int, help="Features present in one model only, per model (default 16).")
@click.option("--scaled", type=int, help="Features present in every model with norm --scale in one of them, "
              "per model (default 0).")
@click.option("--scale", type=float, help="Norm of a scaled feature in its model; 1 in the others (default 0.3).")
@click.option("--model-angle", type=float, help="Degrees between a feature's directions in any two models "
              "(default 0: the same direction).")
@click.option("--span", callback=number_pair("-", int), metavar="MIN-MAX",
              help="Layers a feature spans, a contiguous range of uniform length in MIN..MAX (default 1-LAYERS).")
@click.option("--drift", type=float, help="Degrees a feature's direction turns per layer inside its span "
              "(default 0).")
@click.option("--active", type=float, help="Expected number of features firing per token (default 4).")
@click.option("--frequencies", metavar="DIST", help="Firing probabilities: uniform (default), exponential:LAMBDA "
              "(p_g ~ LAMBDA^g) or zipf:S (p_g ~ 1/(g+1)^S), in a random order over the features.")
@click.option("--magnitude", callback=number_pair(",", float), metavar="LOW,HIGH",
              help="A firing feature's coefficient is uniform in [LOW, HIGH] (default 0.5,1.5).")
@click.option("--correlation", type=float, help="Features in groups of --group-size fire together through a "
              "Gaussian copula of this correlation; each keeps its firing probability (default 0).")
@click.option("--group-size", type=int, help="Features per correlated group (default 4).")
@click.option("--noise", type=float, help="Standard deviation of Gaussian noise on every coordinate (default 0).")
@click.option("--tokens", type=Count(), help="Rows to write (default 65536).")
@click.option("--seed", type=int, help="Everything random derives from it (default 0).")
@click.option("--chunk-rows", type=Count(), default=STORE_CHUNK_ROWS, show_default=True, help="Rows per Zarr chunk.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Storage dtype of the activations.")
@click.option("--codec", type=click.Choice(STORE_CODECS), default=STORE_CODEC, show_default=True,
              help="Compression of the activation chunks.")
@click.option("--overwrite", is_flag=True, help="Replace STORE and its truth if they exist.")
@common_options
def synth_command(spec, output, chunk_rows, dtype, codec, overwrite, **fields):
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
    from xcli.synth import generate, load_spec

    spec_obj = load_spec(spec, **fields)
    generate(spec_obj, output, chunk_rows=chunk_rows, dtype=dtype, codec=codec, overwrite=overwrite)
    click.echo(str(output))


def main():
    cli.main(prog_name="xc")


if __name__ == "__main__":
    main()
