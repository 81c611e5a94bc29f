"""`xc export --format circuit-tracer`: per-layer transcoders as the transcoder set circuit-tracer loads.

    DIR/config.yaml              model_kind: transcoder_set, model_name, feature_input_hook,
                                 feature_output_hook, scan (circuit-tracer's config keys)
    DIR/layer_<L>.safetensors    W_enc (F, d), b_enc (F,), W_dec (F, d), b_dec (d,)
                                 [, activation_function.threshold (F,)]
    DIR/xc-export.json           which checkpoint became which layer

The layout is circuit-tracer's (circuit_tracer/transcoder/single_layer_transcoder.py and
utils/caching.py, 0.5.0): one safetensors file per layer, layers 0..N-1 each once, one latent count
for all; a layer encodes F.linear(x, W_enc, b_enc) at blocks.L.<feature_input_hook>, applies ReLU
(no threshold tensor) or JumpReLU x * (x > threshold), and decodes acts @ W_dec + b_dec at
blocks.L.<feature_output_hook>. DIR loads with `load_transcoders_from_cache(NAME, cache_dir=PARENT)`
when DIR is PARENT/NAME, or uploaded as a hub repository with `load_transcoder_from_hub`.

Each layer is one xc checkpoint that reads one source and writes one source of the same width
(`xc train --read IN --write OUT`), both in block L (resid_post of layer L-1 is hook_resid_pre
of block L, and resid_pre of layer L+1 is hook_resid_post of block L). Weights are written in raw
units (input scales folded). ReLU maps to ReLU; JumpReLU to JumpReLU with its thresholds;
BatchTopK to JumpReLU with threshold_i = theta / ||W_dec,i|| (xc's inference rule, exactly); TopK has no circuit-tracer form and is refused.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from xcli import files, strict_json
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.export.common import (
    HOOK_NAMES,
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    crosscoder_id,
    default_set_name,
    parse_assignments,
)
from xcli.export.config import ExportConfig
from xcli.version import __version__

NEVER = 3.0e38  # JumpReLU threshold of a latent that writes nothing: it never fires


def tl_hook(site: str, layer: int | None) -> tuple[str, int | None] | None:
    """(hook name inside blocks.L, L) of an xc site: mlp_out -> hook_mlp_out; blocks.{layer}.X -> X."""
    if site in HOOK_NAMES:
        return HOOK_NAMES[site], layer
    if site.startswith("blocks.{layer}.") and site.count("{layer}") == 1:
        return site.removeprefix("blocks.{layer}."), layer
    return None


def layer_plan(model: cc.Crosscoder, path: Path, hooks: tuple[str, str] | None) -> tuple[int, str, str]:
    """(layer, input hook, output hook) of one transcoder checkpoint, or one BadInput naming it."""
    where = cc.where(path)
    if len(model.read) != 1 or len(model.write) != 1 or model.read == model.write:
        raise BadInput(f"{where} reads {model.read} and writes {model.write}; a circuit-tracer transcoder reads "
                       f"one source and writes another (xc train --read IN --write OUT)")
    if model.arch == "topk":
        raise BadInput(f"{where} is a TopK transcoder; circuit-tracer's transcoder sets load ReLU and JumpReLU "
                       f"only (train with --arch batchtopk, jumprelu or relu)")
    sources = {s.name: s for s in model.sources}
    s_in, s_out = sources[model.read[0]], sources[model.write[0]]
    if s_in.d != s_out.d:
        raise BadInput(f"{where}: input width {s_in.d} differs from output width {s_out.d}; circuit-tracer's "
                       f"transcoders read and write the residual width d_model")
    if s_out.layer is None:
        raise BadInput(f"{where}: output source {s_out.name!r} has no layer; circuit-tracer needs one per transcoder")
    if hooks is not None:
        return s_out.layer, hooks[0], hooks[1]
    mapped_in, mapped_out = tl_hook(s_in.site, s_in.layer), tl_hook(s_out.site, s_out.layer)
    # The output of block L is the input of block L+1: a transcoder from layer n to layer n+1 reads and
    # writes one block, whichever of the two names its sources use.
    if s_in.site == "resid_post" and s_in.layer is not None and s_in.layer + 1 == s_out.layer:
        mapped_in = ("hook_resid_pre", s_out.layer)
    elif s_out.site == "resid_pre" and s_in.layer is not None and s_in.layer + 1 == s_out.layer:
        mapped_out = ("hook_resid_post", s_in.layer)
    for s, mapped in ((s_in, mapped_in), (s_out, mapped_out)):
        if mapped is None:
            raise BadInput(f"{where}: site {s.site!r} of {s.name!r} has no known TransformerLens hook name; give "
                           f"--hooks IN,OUT (e.g. ln2.hook_normalized,hook_mlp_out)")
    if mapped_in[1] != mapped_out[1]:
        raise BadInput(f"{where} reads {s_in.site} of layer {s_in.layer} and writes {s_out.site} of layer "
                       f"{s_out.layer}; a circuit-tracer transcoder reads and writes one block")
    return mapped_out[1], mapped_in[0], mapped_out[0]


def transcoder_tensors(model: cc.Crosscoder) -> dict[str, torch.Tensor]:
    """One layer's tensors in circuit-tracer's names and orientation, raw units."""
    name_in, name_out = model.read[0], model.write[0]
    with torch.no_grad():
        tensors = {
            "W_enc": (model.encoder_weight(name_in).float() * model.scale(name_in)).T.contiguous(),
            "b_enc": model.b_enc.float().clone(),
            "W_dec": (model.decoder_weight(name_out).float() / model.scale(name_out)).contiguous(),
            "b_dec": (model.decoder_bias(name_out).float() / model.scale(name_out)).contiguous(),
        }
        if model.arch == "jumprelu":  # x * (x > threshold) on the same pre-activation
            tensors["activation_function.threshold"] = model.thresholds().detach().float().clone()
        if model.arch == "batchtopk":
            norms = model.decoder_norms().sum(dim=1).float()  # the selection score's norms (normalised units)
            theta, dead = max(float(model.threshold), 0.0), norms <= 0
            tensors["activation_function.threshold"] = torch.where(
                dead, torch.tensor(NEVER), theta / torch.where(dead, 1.0, norms))
    return tensors


def yaml_line(key: str, value) -> str:
    return f"{key}: {strict_json.dumps(value)}\n"  # a JSON string or null is a YAML scalar


def export_circuit_tracer(config: ExportConfig) -> Path:
    """The transcoders (CHECKPOINT and every --transcoder) as one circuit-tracer transcoder set in config.output."""
    paths = [Path(config.checkpoint)] + [Path(p) for p in config.transcoders]
    files.check_output(config.output, overwrite=config.overwrite)
    if config.overwrite:
        files.check_replaceable(config.output, "export", paths + [config.store, config.classes])
    hooks = tuple(config.hooks) if config.hooks else None
    layers: dict[int, tuple[Path, cc.Crosscoder]] = {}
    plan = {}
    for path in paths:
        model = cc.load(path)
        layer, hook_in, hook_out = layer_plan(model, path, hooks)
        if layer in layers:
            raise BadInput(f"{cc.where(path)} and {cc.where(layers[layer][0])} are both transcoders of layer {layer}")
        layers[layer] = (path, model)
        plan[layer] = (hook_in, hook_out)
    missing = sorted(set(range(max(layers) + 1)) - set(layers))
    if missing:
        raise BadInput(f"no transcoder for layer {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1
                       else "") + "; circuit-tracer needs one for every layer from 0 to the last (--transcoder)")
    first_path, first = layers[0]
    for layer, (path, model) in layers.items():
        if plan[layer] != plan[0]:
            raise BadInput(f"{cc.where(path)} reads {plan[layer][0]} and writes {plan[layer][1]}, layer 0's reads "
                           f"{plan[0][0]} and writes {plan[0][1]}; a transcoder set has one pair of hooks")
        if model.n_latents != first.n_latents:
            raise BadInput(f"{cc.where(path)} has {model.n_latents} latents, {cc.where(first_path)} "
                           f"{first.n_latents}; circuit-tracer needs one latent count for all layers")
    alias = {s.name: s for s in first.sources}[first.write[0]].model
    named = parse_assignments(config.model_ids, "--model-id", [alias], allow_bare=True)
    model_name = named.get(alias, alias)
    scan = config.set_name or default_set_name(first.n_latents, crosscoder_id(first_path))
    with files.atomic_path(config.output, overwrite=config.overwrite) as tmp:
        tmp.mkdir()
        for layer, (_, model) in sorted(layers.items()):
            save_file(transcoder_tensors(model), str(tmp / f"layer_{layer}.safetensors"))
        (tmp / "config.yaml").write_text(
            "# circuit-tracer transcoder set written by xc export --format circuit-tracer\n"
            + yaml_line("model_kind", "transcoder_set") + yaml_line("model_name", model_name)
            + yaml_line("feature_input_hook", plan[0][0]) + yaml_line("feature_output_hook", plan[0][1])
            + yaml_line("scan", scan))
        (tmp / MANIFEST).write_text(strict_json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "circuit-tracer", "complete": True,
            "created_by": f"xc {__version__}", "checkpoint": str(config.checkpoint),
            "layers": [{"layer": layer, "checkpoint": str(path), "arch": model.arch, "read": model.read[0],
                        "write": model.write[0]} for layer, (path, model) in sorted(layers.items())],
        }, indent=2) + "\n")
    return config.output
