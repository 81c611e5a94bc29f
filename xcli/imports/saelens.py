"""SAELens SAEs and transcoders (a folder of cfg.json + sae_weights.safetensors) as xc checkpoints.

The layout (sae_lens/saes/*.py, SAELens 6): W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_out),
b_dec (d_out,), threshold (d_sae,) for JumpReLU; cfg.json names the architecture, d_in, d_sae (d_out for
transcoders), apply_b_dec_to_input, normalize_activations, k and rescale_acts_by_decoder_norm (topk), and
a metadata object with model_name, hook_name (hook_name_out for a transcoder's output). SAELens's
inference, with b = b_dec when apply_b_dec_to_input:

    standard, transcoder:     f = ReLU((x - b) W_enc + b_enc)
    topk:                     p = (x - b) W_enc + b_enc, times ||W_dec,i|| if rescale_acts_by_decoder_norm;
                              f = ReLU of the k largest p (others 0); decoded as f / ||W_dec,i|| when rescaled
    jumprelu (and BatchTopK,  f = ReLU(p) * (p > threshold_i)
    which SAELens saves so)
    x̂ = f W_dec + b_dec

Mapped exactly: standard and transcoder -> relu (b folded into b_enc); topk -> topk (rescaled: the norms
folded into the encoder, unit decoder rows; unrescaled: only when every decoder row has one norm, since
xc ranks by f_i * ||W_dec,i||); jumprelu -> batchtopk when threshold_i * ||W_dec,i|| is one number theta and
k is known (cfg.json or --k; xc's rule f_i * ||W_dec,i|| > theta, what `xc export --format saelens`
wrote for BatchTopK before xc had JumpReLU), -> relu when every threshold is 0, and -> jumprelu with the
thresholds kept otherwise (xc's f = p * (p > threshold) is SAELens's ReLU(p) * (p > threshold) once a
threshold below 0 becomes 0).
"""

from pathlib import Path

import torch

from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput
from xcli.imports.common import Imported, make_source, read_json, read_state_dict, site_of_hook, tensor
from xcli.source import validate_source_names

CFG, WEIGHTS, SCALER = "cfg.json", "sae_weights.safetensors", "activation_scaler.json"
SAE_ARCHS = ("standard", "topk", "jumprelu")
TRANSCODER_ARCHS = ("transcoder", "jumprelu_transcoder")
NEVER_FIRES = 1e30  # a JumpReLU threshold this high keeps a latent off (xc's own export writes 3e38)
SAME = 1e-5  # relative spread under which per-latent numbers count as one number (float32 rounding)


def recognises(path: Path) -> bool:
    return path.is_dir() and (path / CFG).is_file() and (path / WEIGHTS).is_file()


def meta_value(cfg: dict, key: str):
    """A metadata field of SAELens 6 (cfg["metadata"]), or of the flat layout of SAELens 5."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    return meta.get(key, cfg.get(key))


def architecture(cfg: dict, where: str) -> str:
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn"))
    if arch == "standard" and act == "topk":  # SAELens 5 wrote TopK SAEs so
        return "topk"
    if arch == "standard" and act not in (None, "relu"):
        raise BadInput(f"{where}: activation function {act!r:.40} is not one xc has (relu, topk)")
    if arch not in SAE_ARCHS + TRANSCODER_ARCHS:
        raise BadInput(f"{where}: architecture {arch!r:.40} is not imported; xc imports "
                       f"{', '.join(SAE_ARCHS + TRANSCODER_ARCHS)}")
    return arch


def top_k(cfg: dict) -> int | None:
    kwargs = cfg.get("activation_fn_kwargs") if isinstance(cfg.get("activation_fn_kwargs"), dict) else {}
    k = cfg.get("k", kwargs.get("k"))
    return k if isinstance(k, int) and not isinstance(k, bool) else None


def one_threshold(threshold: torch.Tensor, norms: torch.Tensor, where: str) -> float | None:
    """theta when threshold_i * ||W_dec,i|| is one number >= 0 over the latents that can fire; else None."""
    live = (norms > 0) & (threshold < NEVER_FIRES)
    dead_but_open = (norms <= 0) & (threshold < NEVER_FIRES)
    if bool(dead_but_open.any()):
        return None
    if not bool(live.any()):
        return 0.0
    theta = threshold[live].double() * norms[live].double()
    low, high = float(theta.min()), float(theta.max())
    if low < 0 or high - low > SAME * max(abs(high), 1e-30):
        return None
    return float(theta.median())


def scaler(path: Path, norm_mode: str, transcoder: bool, where: str) -> float | None:
    """The scaling factor of an SAELens training checkpoint (activation_scaler.json), or None.

    Final SAEs have it folded into the weights; a checkpoint saved during training keeps it apart,
    and SAELens scales the input by it and the output back, which is xc's input scale exactly."""
    if norm_mode != "expected_average_only_in" or not (path / SCALER).is_file():
        return None
    factor = read_json(path / SCALER).get("scaling_factor")
    if factor is None:
        return None
    if transcoder:
        raise BadInput(f"{where}: a transcoder training checkpoint with an activation scaling factor is not imported")
    if not (isinstance(factor, (int, float)) and not isinstance(factor, bool) and 0 < factor < float("inf")):
        raise BadInput(f"{where}: {SCALER} scaling_factor {factor!r:.40} is not a number above 0")
    return float(factor)


def sources_of(cfg: dict, specs, d_in: int, d_out: int | None, where: str) -> list:
    """The input source (and a transcoder's output source) from --source, else from the metadata."""
    wanted = 1 if d_out is None else 2
    if len(specs) > wanted:
        raise BadInput(f"{len(specs)} --source given; a SAELens {'SAE' if wanted == 1 else 'transcoder'} has "
                       f"{wanted} ({'its input' if wanted == 1 else 'its input, then its output'})")
    model = meta_value(cfg, "model_name")
    hooks = [meta_value(cfg, "hook_name")] + ([meta_value(cfg, "hook_name_out")] if wanted == 2 else [])
    result = []
    for i, (hook, d) in enumerate(zip(hooks, [d_in, d_out])):
        if i < len(specs):
            result.append(make_source(specs[i], d, "--source"))
            continue
        if not isinstance(model, str) or not isinstance(hook, str) or not model or not hook:
            what = "model_name and hook_name" if i == 0 else "hook_name_out"
            raise BadInput(f"{where}: its metadata lacks {what}; give --source [NAME=]MODEL:SITE[:LAYER] for "
                           f"{'the input' if i == 0 else 'the output (after the input)'}")
        site, layer = site_of_hook(hook)
        result.append(make_source((None, model, site, layer), d, f"{where} metadata"))
    validate_source_names(result)
    return result


def convert(path: Path, specs, k_override: int | None = None) -> Imported:
    where = f"SAELens folder {str(path)!r}"
    if not recognises(path):
        raise BadInput(f"{str(path)!r} is not a SAELens folder: it needs {CFG} and {WEIGHTS}")
    cfg = read_json(path / CFG)
    arch = architecture(cfg, where)
    transcoder = arch in TRANSCODER_ARCHS
    tensors = read_state_dict(path / WEIGHTS)
    d_in, F = cfg.get("d_in"), cfg.get("d_sae")
    d_out = cfg.get("d_out") if transcoder else d_in
    for key, value in (("d_in", d_in), ("d_sae", F), ("d_out", d_out)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise BadInput(f"{where}: {CFG} {key} {value!r:.40} is not a whole number >= 1")
    jump = arch in ("jumprelu", "jumprelu_transcoder")
    known = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if jump else set())
    extra = sorted(set(tensors) - known)
    if extra:
        raise BadInput(f"{where}: tensor {extra[0]!r:.60} is not part of a {arch} SAE; xc does not know what it does")
    W_enc = tensor(tensors, "W_enc", (d_in, F), where)
    b_enc = tensor(tensors, "b_enc", (F,), where)
    W_dec = tensor(tensors, "W_dec", (F, d_out), where)
    b_dec = tensor(tensors, "b_dec", (d_out,), where)
    norm_mode = cfg.get("normalize_activations", "none") or "none"
    if norm_mode not in ("none", "expected_average_only_in"):
        raise BadInput(f"{where}: normalize_activations {norm_mode!r:.40} rescales each token at run time (or "
                       f"needs a whitening file); an xc checkpoint scales by a constant, so it is not imported")
    scale = scaler(path, norm_mode, transcoder, where)
    if norm_mode == "none":
        normalisation = "none"
    elif scale is not None:
        normalisation = f"{norm_mode}: its {SCALER} scaling factor {scale} as the input scale"
    else:
        normalisation = f"{norm_mode}: nothing at inference (a final SAELens SAE has its scaling factor folded in)"
    record = {"format": "saelens", "architecture": arch, "path": str(path.resolve()),
              "normalize_activations": normalisation, "sae_lens_version": meta_value(cfg, "sae_lens_version"),
              "hook_name": meta_value(cfg, "hook_name"), "model_name": meta_value(cfg, "model_name")}
    if transcoder:
        record["hook_name_out"] = meta_value(cfg, "hook_name_out")
    for key in ("hook_head_index", "reshape_activations", "context_size", "prepend_bos", "dataset_path"):
        value = meta_value(cfg, key)
        if value is not None:
            record[key] = value
    enc_bias = b_enc.clone()
    if cfg.get("apply_b_dec_to_input", not transcoder) and not transcoder:
        enc_bias = enc_bias - b_dec @ W_enc
        record["apply_b_dec_to_input"] = "folded into encoder_bias"
    norms = W_dec.norm(dim=1)
    xc_arch, k, theta, per_latent = "relu", None, None, None
    if arch == "topk":
        xc_arch, k = "topk", (k_override or top_k(cfg))
        if k is None:
            raise BadInput(f"{where}: a topk SAE without k in {CFG}; give --k")
        if cfg.get("rescale_acts_by_decoder_norm"):
            if not bool((norms > 0).all()):
                raise BadInput(f"{where}: a decoder row of norm 0 under rescale_acts_by_decoder_norm (SAELens "
                               f"divides by it)")
            W_enc, enc_bias, W_dec = W_enc * norms, enc_bias * norms, W_dec / norms[:, None]
            record["rescale_acts_by_decoder_norm"] = "folded: encoder times ||W_dec,i||, decoder rows of norm 1"
        elif float(norms.max() - norms.min()) > SAME * float(norms.max()):
            raise BadInput(f"{where}: its TopK ranks raw pre-activations while its decoder rows differ in norm "
                           f"({float(norms.min()):.4g} to {float(norms.max()):.4g}); xc ranks f_i * ||W_dec,i||, "
                           f"so the picks would differ: not imported")
    elif jump:
        threshold = tensor(tensors, "threshold", (F,), where)
        if bool((threshold == 0).all()):
            record["threshold"] = "every threshold 0: a ReLU"
        else:
            theta = one_threshold(threshold, norms, where)
            k = k_override or top_k(cfg)
            if theta is not None and k is not None:  # a BatchTopK SAE as SAELens saves one: back to BatchTopK
                xc_arch = "batchtopk"
                record["threshold"] = f"threshold_i * ||W_dec,i|| = {theta:.9g} for every latent: xc's BatchTopK rule"
            else:
                if k_override is not None:
                    raise BadInput(f"{where}: --k {k_override} applies to a JumpReLU whose thresholds are one "
                                   f"BatchTopK threshold (threshold_i * ||W_dec,i|| one number); these differ per "
                                   f"latent, so it is imported as JumpReLU without --k")
                record["threshold"] = ("per latent: f_i = ReLU(p_i) where p_i > threshold_i (xc's JumpReLU; "
                                       "thresholds below 0 become 0, the same rule)")
                if theta is not None:
                    record["threshold"] += "; they are one BatchTopK threshold: --k K imports it as BatchTopK"
                xc_arch, k, theta, per_latent = "jumprelu", None, None, threshold.clamp(min=0)
    if k is not None and not 0 < k < F:
        raise BadInput(f"{where}: k {k} must be between 1 and d_sae - 1 ({F - 1})")
    sources = sources_of(cfg, specs, d_in, d_out if transcoder else None, where)
    names = [s.name for s in sources]
    model = Crosscoder(sources, F, xc_arch, k, names[:1], names[-1:])
    with torch.no_grad():
        model.encoder_weight(names[0]).copy_(W_enc)
        model.b_enc.copy_(enc_bias)
        model.decoder_weight(names[-1]).copy_(W_dec)
        model.decoder_bias(names[-1]).copy_(b_dec)
        if theta is not None:
            model.threshold.fill_(theta)
        if per_latent is not None:
            model.set_thresholds(per_latent)
        if scale is not None:  # a training checkpoint: SAELens multiplies the input by it, divides the output
            model.input_scale.fill_(scale)
    record["sources"] = {"input": names[0], "output": names[-1]}
    return Imported(model.eval(), record)
