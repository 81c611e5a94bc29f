"""oli-clive-griffin/crosscode crosscoders (and model-diffing, the repository it grew out of) as xc checkpoints.

Learnt from its public code: crosscode/saveable_module.py, crosscode/models/base_crosscoder.py,
crosscode/models/acausal_crosscoder.py, crosscode/models/activations/{relu,topk,jumprelu}.py,
crosscode/trainers/crosscoder_wrapper.py, crosscode/trainers/trainer.py and config_common.py; the older
names (W_enc_XDH, ..., hidden_activation_classname in model_cfg.yaml) from model_diffing/models/crosscoder.py.

A checkpoint is a folder (`SaveableModule.save`): model.pt, the module's state dict (torch.save), and
model_cfg.yaml, what rebuilds the module (for ModelHookpointAcausalCrosscoder: n_models, n_hookpoints,
d_model, n_latents, activation_fn {classname, cfg}, use_encoder_bias, use_decoder_bias, dtype). Trainers
save step_N folders under the experiment folder, beside experiment_config.yaml (the llms and hookpoints).
The state dict, with crosscoding dims Xi (input) and Xo (output), (n_models, n_hookpoints) for both in
an acausal crosscoder, () in and (n_layers_out,) out in a cross-layer transcoder:

    _W_enc_XiDiL (*Xi, D, L)   b_enc_L (L,)           (older: W_enc_XDH, b_enc_H)
    _W_dec_LXoDo (L, *Xo, D)   _b_dec_XoDo (*Xo, D)   (older: W_dec_HXD, b_dec_XD); the biases are optional
    folded_scaling_factors_in_Xi, folded_scaling_factors_out_Xo, is_folded
    _activation_fn.log_threshold_L (L,)             JumpReLU only (activation_fn. or hidden_activation. in
                                                    older versions)

Their forward, on activations x (B, *Xi, D):

    p = einsum(x, W_enc, "b ..., ... l -> b l") + b_enc
    f = act(p)     ReLU: max(p, 0); JumpReLU: p * (p > exp(log_threshold)); TopK: the k largest p kept as they
                   are (negative ones too), others 0; BatchTopK: the k*B largest p of the batch; GroupMax: the
                   largest p of each of k groups
    x̂ = einsum(f, W_dec, "b l, l ... -> b ...") + b_dec

Training scales each (model, hookpoint) by s = sqrt(D) / mean norm; saving folds s into the weights
(W_enc * s_in, W_dec / s_out, b_dec / s_out, is_folded set), so a saved model runs on raw activations and
xc's input scale stays 1. Every (model, hookpoint) becomes an xc source, model-major; the encoder, decoder
and biases map one to one. ReLU and JumpReLU are then exact. TopK is exact in its picks only when every
latent's summed decoder norm is the same (xc ranks f_i * sum ||W_dec,i||, crosscode ranks p_i), and xc
zeroes the negative values crosscode keeps when fewer than k pre-activations are positive: imported
with that difference recorded. BatchTopK (no inference threshold: its output depends on the batch) and
GroupMax have no xc counterpart and are refused.
"""

import re
from dataclasses import replace
from pathlib import Path

import torch

from xcli import console
from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput
from xcli.imports.common import (
    MAX_CONFIG_BYTES,
    Imported,
    make_source,
    read_state_dict,
    site_of_hook,
    sources_for,
    tensor,
)
from xcli.source import validate_source_names

STATE_DICT, MODEL_CFG, EXPERIMENT_CFG = "model.pt", "model_cfg.yaml", "experiment_config.yaml"
# (current name, older model_diffing name) of each weight.
W_ENC, W_DEC, B_ENC, B_DEC = ("_W_enc_XiDiL", "W_enc_XDH"), ("_W_dec_LXoDo", "W_dec_HXD"), \
    ("b_enc_L", "b_enc_H"), ("_b_dec_XoDo", "b_dec_XD")
THRESHOLD_OWNERS = ("_activation_fn", "activation_fn", "hidden_activation")
THRESHOLD_NAMES = tuple(f"{o}.log_threshold_{s}" for o in THRESHOLD_OWNERS for s in "LH")
FOLD_BUFFERS = ("folded_scaling_factors_in_Xi", "folded_scaling_factors_out_Xo", "folded_scaling_factors_X",
                "is_folded")
RELU, TOPK, BATCHTOPK, GROUPMAX = "ReLUActivation", "TopkActivation", "BatchTopkActivation", "GroupMaxActivation"
JUMPRELUS = ("AnthropicSTEJumpReLUActivation", "AnthropicJumpReLUActivation", "JumpReLUActivation",
             "JumpReLUActivationFunction")
SAME = 1e-5  # relative spread under which per-latent numbers count as one number (float32 rounding)
EXAMPLE = "--source base=google/gemma-2-2b:resid_post:13 --source chat=google/gemma-2-2b-it:resid_post:13"


def recognises(shapes: dict) -> bool:
    """Its encoder and decoder weights, under the current or the older names."""
    return any(e in shapes and d in shapes for e, d in zip(W_ENC, W_DEC))


def is_folder(path: Path) -> bool:
    return path.is_dir() and (path / STATE_DICT).is_file()


def files_of(path: Path) -> tuple[Path, Path | None, Path | None]:
    """(model.pt, model_cfg.yaml or None, experiment_config.yaml or None) of a checkpoint folder or its
    model.pt; the experiment config sits in the folder above a step_N folder (or in the folder itself)."""
    folder = path if path.is_dir() else path.parent
    weights = folder / STATE_DICT if path.is_dir() else path
    if not weights.is_file():
        raise BadInput(f"{str(path)!r} has no {STATE_DICT}; a crosscode checkpoint folder holds {STATE_DICT} and "
                       f"{MODEL_CFG}")
    cfg = folder / MODEL_CFG
    experiment = next((p for p in (folder / EXPERIMENT_CFG, folder.parent / EXPERIMENT_CFG) if p.is_file()), None)
    return weights, (cfg if cfg.is_file() else None), experiment


def read_yaml(path: Path) -> dict:
    """A small YAML mapping, read safely: plain YAML plus the `!!python/tuple` tag that yaml.dump writes
    for tuples (crosscode loads it the same way); any other Python tag is refused, never constructed."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: list(loader.construct_sequence(node)))
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise BadInput(f"{str(path)!r} is over {MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        value = yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader: no Python objects
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{str(path)!r} is not plain YAML ({first[:160]})") from None
    if not isinstance(value, dict):
        raise BadInput(f"{str(path)!r} holds a YAML {type(value).__name__}, not a mapping")
    return value


def first(tensors: dict, names: tuple) -> str | None:
    return next((n for n in names if n in tensors), None)


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def activation(cfg: dict, tensors: dict, where: str) -> tuple[str, dict]:
    """(classname, its cfg) from model_cfg.yaml; without one, only a log_threshold tells (JumpReLU)."""
    act = cfg.get("activation_fn")
    if isinstance(act, dict) and isinstance(act.get("classname"), str):
        return act["classname"], act.get("cfg") if isinstance(act.get("cfg"), dict) else {}
    if isinstance(cfg.get("hidden_activation_classname"), str):  # the older model_diffing AcausalCrosscoder
        act_cfg = cfg.get("hidden_activation_cfg")
        return cfg["hidden_activation_classname"], act_cfg if isinstance(act_cfg, dict) else {}
    if first(tensors, THRESHOLD_NAMES):
        return JUMPRELUS[0], {}
    raise BadInput(f"{where}: no {MODEL_CFG} naming its activation function (activation_fn.classname) beside "
                   f"{STATE_DICT}; ReLU and TopK save the same tensors, so xc cannot tell which it is")


def check_config(cfg: dict, Xi: tuple, Xo: tuple, D: int, F: int, where: str) -> None:
    """The dims model_cfg.yaml declares agree with the tensors'."""
    expected = {"n_latents": F, "hidden_dim": F, "d_model": D}
    if "n_models" in cfg or "n_hookpoints" in cfg:
        expected.update(n_models=Xo[0] if len(Xo) == 2 else None, n_hookpoints=Xo[1] if len(Xo) == 2 else None)
    if "n_layers_out" in cfg:
        expected["n_layers_out"] = Xo[0] if len(Xo) == 1 else None
    if "crosscoding_dims" in cfg:
        expected["crosscoding_dims"] = list(Xo)
    for key, want in expected.items():
        got = cfg.get(key)
        if got is not None and got != want:
            raise BadInput(f"{where}: {MODEL_CFG} says {key} {got!r:.40} but the tensors have "
                           f"{'no such dims' if want is None else want} (Xi {Xi}, Xo {Xo}, D {D}, L {F})")


def experiment_sources(path: Path | None, n: int, D: int, where: str) -> list | None:
    """Sources of an acausal crosscoder from experiment_config.yaml: every (llm, hookpoint), model-major,
    as their dataloader stacks them (B, M, P, D). None when the file is absent or does not say."""
    if path is None:
        return None
    exp = read_yaml(path)
    data = exp.get("data") if isinstance(exp.get("data"), dict) else {}
    harvester = data.get("activations_harvester") if isinstance(data.get("activations_harvester"), dict) else {}
    llms, hooks = harvester.get("llms"), exp.get("hookpoints")
    if not (isinstance(llms, list) and isinstance(hooks, list) and llms and hooks
            and all(isinstance(h, str) for h in hooks) and all(isinstance(m, dict) for m in llms)):
        return None
    if len(llms) * len(hooks) != n:
        raise BadInput(f"{where}: {str(path)!r} lists {len(llms)} llms and {len(hooks)} hookpoints, but the "
                       f"weights have {n} (model, hookpoint) pairs; give --source once per pair")
    models = []
    for m in llms:
        name = m.get("name") or m.get("hf_model_name")
        if not isinstance(name, str) or not name:
            return None
        revision = m.get("revision") if isinstance(m.get("revision"), str) else None
        models.append((name, revision))
    sources = []
    for model, revision in models:
        for hook in hooks:
            site, layer = site_of_hook(hook)
            sources.append(replace(make_source((None, model, site, layer), D, f"{where}: {EXPERIMENT_CFG}"),
                                   revision=revision))
    names = [s.name for s in sources]
    if len(set(names)) < len(names):  # the same model at two revisions: the revision tells them apart
        sources = [replace(s, name=re.sub(r"[^A-Za-z0-9_.-]", "-", f"{s.name}.{s.revision}"))
                   if s.revision is not None and names.count(s.name) > 1 else s for s in sources]
    validate_source_names(sources)
    return sources


def topk_difference(W_dec: list[torch.Tensor], where: str) -> str:
    """Why a crosscode TopK is (almost) xc's: the summed decoder norms are one number, else refused."""
    norms = sum(w.norm(dim=1) for w in W_dec)
    low, high = float(norms.min()), float(norms.max())
    if high - low > SAME * max(high, 1e-30):
        raise BadInput(f"{where}: its TopK keeps the k largest raw pre-activations while the latents' summed decoder "
                       f"norms differ ({low:.4g} to {high:.4g}); xc ranks f_i * sum ||W_dec,i||, so the picks would "
                       f"differ: not imported")
    return ("exact where the k largest pre-activations are positive; where fewer than k are, crosscode keeps the "
            "negative ones among its k and xc sets them to 0")


def convert(path: Path, specs, k_override: int | None = None) -> Imported:
    weights, cfg_path, experiment = files_of(path)
    where = f"crosscode checkpoint {str(weights)!r}"
    tensors = read_state_dict(weights)
    if not recognises(tensors):
        raise BadInput(f"{where}: no {W_ENC[0]} and {W_DEC[0]} (or {W_ENC[1]}, {W_DEC[1]}); not a crosscode crosscoder")
    if any(k.startswith("W_skip") for k in tensors):
        raise BadInput(f"{where}: it has a linear skip connection (W_skip); xc crosscoders have none, so it is not "
                       f"imported")
    unknown = sorted(set(tensors) - set(W_ENC + W_DEC + B_ENC + B_DEC + FOLD_BUFFERS + THRESHOLD_NAMES))
    if unknown:
        raise BadInput(f"{where}: tensor {unknown[0]!r:.80} is not part of a crosscode crosscoder xc knows; xc does "
                       f"not know what it does, so it is not imported")
    cfg = read_yaml(cfg_path) if cfg_path else {}
    enc_name, dec_name = first(tensors, W_ENC), first(tensors, W_DEC)
    enc, dec = tensors[enc_name], tensors[dec_name]
    if enc.dim() < 2 or dec.dim() < 2:
        raise BadInput(f"{where}: {enc_name} has shape {tuple(enc.shape)} and {dec_name} {tuple(dec.shape)}; expected "
                       f"(*Xi, D, L) and (L, *Xo, D)")
    *Xi, D_in, F = enc.shape
    _, *Xo, D_out = dec.shape
    Xi, Xo = tuple(Xi), tuple(Xo)
    check_config(cfg, Xi, Xo, D_out, F, where)
    W_enc = tensor(tensors, enc_name, (*Xi, D_in, F), where)
    W_dec = tensor(tensors, dec_name, (F, *Xo, D_out), where)
    b_enc_name, b_dec_name = first(tensors, B_ENC), first(tensors, B_DEC)
    b_enc = tensor(tensors, b_enc_name, (F,), where) if b_enc_name else torch.zeros(F)
    b_dec = tensor(tensors, b_dec_name, (*Xo, D_out), where) if b_dec_name else torch.zeros(*Xo, D_out)
    n_in, n_out = int(torch.tensor(Xi).prod()) if Xi else 1, int(torch.tensor(Xo).prod()) if Xo else 1
    W_enc, W_dec, b_dec = W_enc.reshape(n_in, D_in, F), W_dec.reshape(F, n_out, D_out), b_dec.reshape(n_out, D_out)
    shared = Xi == Xo and D_in == D_out  # acausal: each (model, hookpoint) is read and written

    folded = tensors.get("is_folded")
    if folded is None or folded.numel() != 1 or not bool(folded.item()):
        raise BadInput(f"{where}: is_folded is {'missing' if folded is None else 'false'}: its weights expect "
                       f"activations scaled by the factors it was trained with, which the checkpoint does not "
                       f"keep (crosscode's trainers fold them in when they save); not imported")
    factors = {k: tensors[k].flatten().tolist() for k in FOLD_BUFFERS[:3] if k in tensors}

    classname, act_cfg = activation(cfg, tensors, where)
    record = {"format": "crosscode", "path": str(path.resolve()), "activation": classname,
              "class": "acausal crosscoder" if shared else "cross-layer transcoder",
              "crosscoding_dims": {"in": list(Xi), "out": list(Xo)},
              "normalisation": "none at inference: crosscode folded its scaling factors into the weights when "
                               "saving (is_folded)", "folded_scaling_factors": factors}
    if not b_enc_name or not b_dec_name:
        record["biases"] = "absent ones are zero (use_encoder_bias / use_decoder_bias false)"
    xc_arch, k, thresholds = "relu", None, None
    if classname == RELU:
        pass
    elif classname in JUMPRELUS:
        name = first(tensors, THRESHOLD_NAMES)
        if name is None:
            raise BadInput(f"{where}: a {classname} without its log_threshold_L tensor")
        thresholds = tensor(tensors, name, (F,), where).exp()
        xc_arch = "jumprelu"
        record["threshold"] = f"exp({name}) per latent: f_i = p_i where p_i > threshold_i, else 0 (xc's JumpReLU)"
    elif classname == TOPK:
        k = k_override or act_cfg.get("k")
        if not whole(k):
            raise BadInput(f"{where}: a TopkActivation without k in {MODEL_CFG}; give --k")
        xc_arch = "topk"
    elif classname == BATCHTOPK:
        raise BadInput(f"{where}: its BatchTopkActivation keeps the k*B largest pre-activations of whatever batch it "
                       f"is given and has no inference threshold, so its output depends on the batch; xc's "
                       f"BatchTopK infers with a threshold, so it is not imported")
    elif classname == GROUPMAX:
        raise BadInput(f"{where}: GroupMaxActivation (the largest latent of each of k groups) has no xc "
                       f"counterpart; not imported")
    else:
        raise BadInput(f"{where}: activation {classname!r:.60} is not one xc imports ({RELU}, {TOPK}, "
                       f"{', '.join(JUMPRELUS[:1])})")
    if k is not None and not 0 < k < F:
        raise BadInput(f"{where}: k {k} must be between 1 and the number of latents - 1 ({F - 1})")

    widths = [D_out] * n_out if shared else [D_in] * n_in + [D_out] * n_out
    sources = None if specs or not shared else experiment_sources(experiment, n_out, D_out, where)
    if sources is None:
        what = "(model, hookpoint) pairs" if shared else "sources (the inputs, then the outputs)"
        sources = sources_for(specs, widths, what, EXAMPLE)
        record["sources_from"] = "--source"
    else:
        record["sources_from"] = str(experiment)
    names = [s.name for s in sources]
    read, write = (names, names) if shared else (names[:n_in], names[n_in:])
    if xc_arch == "topk":
        note = topk_difference([W_dec[:, j] for j in range(n_out)], where)
        record["topk"] = note
        console.warn(f"crosscode TopK imported: {note}")
    model = Crosscoder(sources, F, xc_arch, k, read, write)
    with torch.no_grad():
        model.b_enc.copy_(b_enc)
        for i, name in enumerate(read):
            model.encoder_weight(name).copy_(W_enc[i])
        for j, name in enumerate(write):
            model.decoder_weight(name).copy_(W_dec[:, j])
            model.decoder_bias(name).copy_(b_dec[j])
        if thresholds is not None:
            model.set_thresholds(thresholds)
    record["layers"] = {"in": read, "out": write}
    if cfg:  # its small plain settings (YAML may hold dates and nested objects: left out)
        record["config"] = {key: value for key, value in cfg.items()
                            if isinstance(value, (str, int, float, bool, type(None)))}
        record["activation_cfg"] = {key: value for key, value in act_cfg.items()
                                    if isinstance(value, (str, int, float, bool, type(None)))}
    return Imported(model.eval(), record)
