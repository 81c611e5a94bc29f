"""science-of-finetuning/dictionary_learning crosscoders (`CrossCoder`, `BatchTopKCrossCoder`) as xc checkpoints.

Their state dict (dictionary_learning/dictionary.py of that fork; the format of the public Gemma-2-2B
base/chat crosscoders and of diffing-toolkit), L layers of width d, F latents:

    encoder.weight (L, d, F)   encoder.bias (F,)   decoder.weight (L, F, d)   decoder.bias (L, d)
    code_normalization_id ()   1 CROSSCODER, 2 SAE, 3 MIXED, 4 NONE, 5 DECOUPLED (absent: CROSSCODER)
    activation_mean (L, d), activation_std (L, d), target_rms (), activation_global_scale (L,)
                               the input normaliser; NaN mean/std (or absent) = none
    k (), threshold ()         BatchTopKCrossCoder; threshold -1 = never set (every positive latent fires)

Saved by `torch.save(state_dict)` (model_final.pt) or by the hub mixin (config.json + model.safetensors).
Their inference, with g_l = activation_global_scale[l] (target_rms / sqrt(sum_d std_ld^2)):

    x'_l = (x_l - mean_l) g_l
    f    = ReLU(sum_l x'_l W_enc[l] + b_enc);  BatchTopK: f * (f * w > threshold), w_i = sum_l ||W_dec[l, i]||
    x̂_l  = (f W_dec[l] + b_dec[l]) / g_l + mean_l

In xc the scale g_l is the source's input_scale and the mean folds into the biases exactly:
b_enc' = b_enc - sum_l (mean_l g_l) W_enc[l], b_dec'_l = b_dec_l + mean_l g_l. Decoder norms, the
selection score and the threshold are then the same numbers in both. The code normalisation changes
only the training loss for CrossCoder (recorded); for BatchTopK it chooses the score the threshold
compares, which xc fixes to CROSSCODER's: other modes are refused unless the threshold was never set.
"""

from pathlib import Path

import torch

from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput
from xcli.imports.common import Imported, read_json, read_state_dict, sources_for, tensor

CODE_NORMALISATIONS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}
HUB_WEIGHTS, HUB_CONFIG = "model.safetensors", "config.json"
HUB_WEIGHT_FILES = (HUB_WEIGHTS, "pytorch_model.bin")
EXAMPLE = "--source base:resid_post:13 --source chat:resid_post:13"


def recognises(shapes: dict) -> bool:
    """Their four weight tensors, 3-D encoder and decoder weights (names with or without _orig_mod.)."""
    shapes = {k.removeprefix("_orig_mod."): v for k, v in shapes.items()}
    return {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"} <= set(shapes) and \
        len(shapes["encoder.weight"]) == 3 and len(shapes["decoder.weight"]) == 3


def hub_weights(folder: Path) -> Path | None:
    """The weights file of a hub folder: model.safetensors, or the older hub mixin's pytorch_model.bin."""
    return next((folder / name for name in HUB_WEIGHT_FILES if (folder / name).is_file()), None)


def files_of(path: Path) -> tuple[Path, Path | None]:
    """(weights, config or None): a hub folder, or a weights file with an optional config.json beside it."""
    if path.is_dir():
        weights = hub_weights(path)
        if weights is None:
            raise BadInput(f"{str(path)!r} has no {HUB_WEIGHTS}; a dictionary_learning hub folder holds "
                           f"{HUB_CONFIG} and {HUB_WEIGHTS}")
        return weights, (path / HUB_CONFIG if (path / HUB_CONFIG).is_file() else None)
    beside = path.with_name(HUB_CONFIG)
    return path, (beside if beside.is_file() else None)


def code_normalisation(tensors: dict, config: dict, where: str) -> tuple[str, str]:
    """(mode, where it came from): the buffer, else the hub config, else CROSSCODER as their loader assumes."""
    if "code_normalization_id" in tensors:
        value = tensors["code_normalization_id"]
        if value.numel() != 1 or int(value.item()) not in CODE_NORMALISATIONS:
            raise BadInput(f"{where}: code_normalization_id {value.flatten()[:4].tolist()} is not one of "
                           f"{', '.join(f'{k} ({v})' for k, v in CODE_NORMALISATIONS.items())}")
        return CODE_NORMALISATIONS[int(value.item())], "code_normalization_id"
    named = config.get("code_normalization")
    if isinstance(named, str):
        if named.upper() not in CODE_NORMALISATIONS.values():
            raise BadInput(f"{where}: code_normalization {named!r} is not one of "
                           f"{', '.join(CODE_NORMALISATIONS.values())}")
        return named.upper(), "config code_normalization"
    return "CROSSCODER", "not recorded; CROSSCODER assumed (their loader's default for older checkpoints)"


def normaliser(tensors: dict, L: int, d: int, where: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean (L, d), g (L,)) of their input normaliser, or None when the checkpoint has none."""
    if "activation_mean" not in tensors or "activation_std" not in tensors:
        return None
    mean, std = tensors["activation_mean"].float(), tensors["activation_std"].float()
    if torch.isnan(mean).any() or torch.isnan(std).any():
        return None  # their "no normaliser" marker
    mean = tensor({"m": mean}, "m", (L, d), f"{where}: activation_mean")
    std = tensor({"s": std}, "s", (L, d), f"{where}: activation_std")
    if "activation_global_scale" in tensors:
        g = tensor(tensors, "activation_global_scale", (L,), where)
    else:  # older checkpoints: computed as their constructor does
        rms = tensor(tensors, "target_rms", (), where) if "target_rms" in tensors else torch.tensor(1.0)
        g = rms / torch.sqrt((std ** 2).sum(dim=-1) + 1e-8)
    if not (g > 0).all():
        raise BadInput(f"{where}: activation_global_scale {g.tolist()} must be above 0 in every layer")
    return mean, g


def read_layers(config: dict, L_enc: int, L_dec: int, where: str) -> list[int]:
    """Which of the L_dec layers the encoder reads: all, or the hub config's encoder_layers."""
    chosen = config.get("encoder_layers")
    if chosen is None:
        if L_enc != L_dec:
            raise BadInput(f"{where}: the encoder has {L_enc} layers and the decoder {L_dec}, and no "
                           f"encoder_layers in {HUB_CONFIG} says which layers the encoder reads")
        return list(range(L_dec))
    if not (isinstance(chosen, list) and len(chosen) == L_enc and len(set(chosen)) == L_enc
            and all(isinstance(i, int) and 0 <= i < L_dec for i in chosen)):
        raise BadInput(f"{where}: encoder_layers {chosen!r:.60} is not {L_enc} distinct layers out of 0..{L_dec - 1}")
    return chosen


def convert(path: Path, specs, k_override: int | None = None) -> Imported:
    weights, config_path = files_of(path)
    where = f"dictionary_learning crosscoder {str(weights)!r}"
    tensors = read_state_dict(weights)
    if any(k.startswith("_orig_mod.") for k in tensors):  # saved while torch.compile wrapped it
        tensors = {k.removeprefix("_orig_mod."): v for k, v in tensors.items()}
    if not recognises({k: tuple(v.shape) for k, v in tensors.items()}):
        raise BadInput(f"{where}: no 3-D encoder.weight, decoder.weight with encoder.bias, decoder.bias; not a "
                       f"dictionary_learning CrossCoder")
    config = read_json(config_path) if config_path else {}
    config = config.get("trainer", config) if isinstance(config.get("trainer"), dict) else config
    L_enc, d, F = tensors["encoder.weight"].shape
    L = tensors["decoder.weight"].shape[0]
    W_enc = tensor(tensors, "encoder.weight", (L_enc, d, F), where)
    b_enc = tensor(tensors, "encoder.bias", (F,), where)
    W_dec = tensor(tensors, "decoder.weight", (L, F, d), where)
    b_dec = tensor(tensors, "decoder.bias", (L, d), where)
    read = read_layers(config, L_enc, L, where)
    mode, mode_from = code_normalisation(tensors, config, where)
    batchtopk = "k" in tensors or "threshold" in tensors
    dict_class = config.get("dict_class") or ("BatchTopKCrossCoder" if batchtopk else "CrossCoder")
    if dict_class not in ("CrossCoder", "BatchTopKCrossCoder"):
        raise BadInput(f"{where}: dict_class {dict_class!r:.60} is not CrossCoder or BatchTopKCrossCoder; "
                       f"xc imports only those")
    if (dict_class == "BatchTopKCrossCoder") != batchtopk:
        raise BadInput(f"{where}: {HUB_CONFIG} says {dict_class} but the tensors "
                       f"{'hold' if batchtopk else 'lack'} k and threshold")
    sources = sources_for(specs, [d] * L, "layers", EXAMPLE)
    names = [s.name for s in sources]
    record = {"format": "dictionary_learning", "class": dict_class, "path": str(path.resolve()),
              "code_normalization": mode, "code_normalization_from": mode_from,
              "layers": {str(i): n for i, n in enumerate(names)}}
    k, threshold = None, None
    if batchtopk:
        if "k" not in tensors or "threshold" not in tensors:
            raise BadInput(f"{where}: a BatchTopKCrossCoder has both k and threshold; one is missing")
        if mode == "DECOUPLED" or tensors["threshold"].numel() != 1:
            raise BadInput(f"{where}: a DECOUPLED BatchTopKCrossCoder selects and thresholds each layer apart; xc's "
                           f"BatchTopK selects once over all sources, so it is not imported")
        if tensors["k"].numel() != 1:
            raise BadInput(f"{where}: k has shape {tuple(tensors['k'].shape)}, expected a single number")
        k = int(tensors["k"].item()) if k_override is None else k_override
        threshold = float(tensor(tensors, "threshold", (), where))
        if mode != "CROSSCODER" and threshold >= 0:
            raise BadInput(f"{where}: its BatchTopK thresholds f_i * w_i with {mode} code normalisation; xc "
                           f"thresholds f_i * sum_l ||W_dec[l, i]|| (CROSSCODER), which no single threshold "
                           f"turns into this one, so it is not imported")
        record.update({"k": k, "threshold": threshold,
                       "threshold_meaning": "never set (-1): every positive latent fires" if threshold < 0 else
                       "f_i * sum_l ||W_dec[l, i]|| > threshold, in their normalised units (xc's rule)"})
        if not 0 < k < F:
            raise BadInput(f"{where}: k {k} must be between 1 and the number of latents - 1 ({F - 1})")
    model = Crosscoder(sources, F, "batchtopk" if batchtopk else "relu", k, [names[i] for i in read], names)
    norm = normaliser(tensors, L, d, where)
    with torch.no_grad():
        enc_bias = b_enc.clone()
        dec_bias = b_dec.clone()
        if norm is not None:
            mean, g = norm
            for j, i in enumerate(read):
                enc_bias -= (mean[i] * g[i]) @ W_enc[j]
            dec_bias += mean * g[:, None]
            model.input_scale.copy_(g)
            record["normalisation"] = ("their activation normaliser, exactly: scale g_l = activation_global_scale "
                                       "as input_scale, mean folded into encoder_bias and decoder_bias")
            record["input_scale"] = g.tolist()
        else:
            record["normalisation"] = "none (no activation normaliser in the checkpoint)"
        model.b_enc.copy_(enc_bias)
        for j, i in enumerate(read):
            model.encoder_weight(names[i]).copy_(W_enc[j])
        for i, name in enumerate(names):
            model.decoder_weight(name).copy_(W_dec[i])
            model.decoder_bias(name).copy_(dec_bias[i])
        if threshold is not None:
            model.threshold.fill_(threshold)
    if config:
        record["config"] = {key: value for key, value in config.items()  # its small settings, not tensors
                            if isinstance(value, (str, int, float, bool, type(None)))
                            or (isinstance(value, list) and len(value) <= 64)}
    return Imported(model.eval(), record)
