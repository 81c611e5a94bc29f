"""Gemma Scope and Gemma Scope 2 JumpReLU SAEs and transcoders (google/gemma-scope-*, google/gemma-scope-2-*)
as xc checkpoints.

Learnt from SAELens 6.54 (sae_lens/loading/pretrained_sae_loaders.py: gemma_2_sae_huggingface_loader,
gemma_2_transcoder_huggingface_loader, get_gemma_3_config_from_hf, gemma_3_sae_huggingface_loader) and
the Gemma Scope tutorial's JumpReLUSAE, which those loaders follow. One dictionary per folder:

    Gemma Scope    params.npz          w_enc (d_in, F), w_dec (F, d_out), b_enc (F,), b_dec (d_out,),
                                       threshold (F,); no config (SAELens infers it from the repository)
    Gemma Scope 2  params.safetensors  the same names; config.json beside it: architecture "jump_relu",
                                       model_name, hf_hook_point_in, hf_hook_point_out (transcoders),
                                       affine_connection (skip transcoders: affine_skip_connection
                                       (d_in, d_out) in the weights)

Their forward (no input centring, no normalisation: apply_b_dec_to_input false, normalize_activations none):

    p = x W_enc + b_enc;   f = ReLU(p) * (p > threshold);   x̂ = f W_dec + b_dec

which is xc's JumpReLU, f = p * (p > threshold), with the per-latent thresholds kept: for a threshold
below 0 theirs fires at p > 0, so it becomes 0 (exact, recorded). An SAE reads and writes one source; a
transcoder reads its input and writes its output. Sources come from config.json (Gemma Scope 2: the
model, and the sites of its HF hook points) or from --source (one for an SAE; the input, then the
output, for a transcoder: params.npz does not say which it is).

Not imported: skip transcoders (xc has no affine skip), a finetuning scaling_factor other than 1, Gemma
Scope 2's multi-layer crosscoders (no public loader reads them, so their layout is not known here) and
its CLTs (SAELens reads one layer's file, w_dec (F, n_out, d), only by summing the decoders over the
output layers; which layers those are is not documented).
"""

import re
from pathlib import Path

import numpy as np
import torch

from xcli.crosscoder.model import Crosscoder
from xcli.errors import BadInput
from xcli.imports.common import Imported, make_source, read_json, read_state_dict, sources_for, tensor
from xcli.source import validate_source_names

NPZ, SAFETENSORS, CONFIG = "params.npz", "params.safetensors", "config.json"
KEYS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
# Gemma Scope 2's HF hook points and the xc sites that read the same tensors (xcli/lm/sites.py: mlp_out of a
# Gemma-3 block is its post_feedforward_layernorm's output; a module path site is a module's output).
HF_HOOK = re.compile(r"^model\.layers\.(\d+)(?:\.(.+))?\.(output|input)$")
EXAMPLE = "--source google/gemma-3-1b-pt:resid_post:13"


def recognises(shapes: dict) -> bool:
    """w_enc, w_dec and threshold: the Gemma Scope names (SAELens's own use W_enc)."""
    return {"w_enc", "w_dec", "threshold"} <= set(shapes)


def weights_file(path: Path) -> Path | None:
    if path.is_dir():
        return next((path / n for n in (SAFETENSORS, NPZ) if (path / n).is_file()), None)
    return path if path.name.endswith((".npz", ".safetensors")) else None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of an .npz, without pickles (allow_pickle=False refuses object arrays)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except Exception as e:  # noqa: BLE001 -- any failure of an untrusted file is one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BadInput(f"{str(path)!r} is not a readable .npz of plain arrays ({first[:160]})") from None


def npz_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in read_npz(path).items()}


def model_name(raw: str) -> str:
    """Gemma Scope 2's config model_name as the HF model id, as SAELens's get_gemma_3_config_from_hf makes it."""
    name = raw if "google" in raw else "google/" + raw
    name = name.replace("-v3", "-3")
    return name.replace("-pt", "") if "270m" in name else name


def site_of_hf_hook(hook: str) -> tuple[str, int] | None:
    """(xc site, layer) reading what an HF hook point of Gemma Scope 2 reads; None for a module's input."""
    m = HF_HOOK.match(hook)
    if not m or m.group(3) == "input":
        return None
    layer, module = int(m.group(1)), m.group(2)
    if module is None:
        return "resid_post", layer
    if module == "post_feedforward_layernorm":
        return "mlp_out", layer
    return f"model.layers.{{layer}}.{module}", layer


def config_sources(config: dict, d_in: int, d_out: int, transcoder: bool, where: str) -> list | None:
    """The sources config.json names (its model and HF hook points), or None when it does not say."""
    raw, hooks = config.get("model_name"), [config.get("hf_hook_point_in")]
    if transcoder:
        hooks.append(config.get("hf_hook_point_out"))
    if not isinstance(raw, str) or not all(isinstance(h, str) for h in hooks):
        return None
    sources = []
    for hook, d in zip(hooks, (d_in, d_out)):
        site = site_of_hf_hook(hook)
        if site is None:
            raise BadInput(f"{where}: hook point {hook!r:.80} is a module's input, which no xc site reads; give "
                           f"--source [NAME=]MODEL:SITE[:LAYER] for {'each source' if transcoder else 'it'}")
        sources.append(make_source((None, model_name(raw), site[0], site[1]), d, f"{where}: {CONFIG}"))
    validate_source_names(sources)
    return sources


def convert(path: Path, specs, k_override: int | None = None) -> Imported:
    weights = weights_file(path)
    if weights is None:
        raise BadInput(f"{str(path)!r} has no {SAFETENSORS} or {NPZ}; a Gemma Scope folder holds one")
    where = f"Gemma Scope dictionary {str(weights)!r}"
    folder = weights.parent
    config = read_json(folder / CONFIG) if (folder / CONFIG).is_file() else {}
    tensors = read_npz(weights) if weights.suffix == ".npz" else read_state_dict(weights)
    if not recognises(tensors):
        raise BadInput(f"{where}: no w_enc, w_dec and threshold; not a Gemma Scope JumpReLU dictionary")
    arch = config.get("architecture", "jump_relu")
    if arch != "jump_relu":
        raise BadInput(f"{where}: {CONFIG} architecture {arch!r:.40} is not jump_relu")
    if config.get("affine_connection") or "affine_skip_connection" in tensors:
        raise BadInput(f"{where}: a skip transcoder (affine_skip_connection); xc has no affine skip, so it is not "
                       f"imported")
    if "scaling_factor" in tensors and not bool((tensors["scaling_factor"] == 1).all()):
        raise BadInput(f"{where}: a finetuning scaling_factor other than 1; not imported")
    extra = sorted(set(tensors) - set(KEYS) - {"scaling_factor"})
    if extra:
        raise BadInput(f"{where}: tensor {extra[0]!r:.60} is not part of a Gemma Scope JumpReLU dictionary")
    w_enc, w_dec = tensors["w_enc"], tensors["w_dec"]
    if w_enc.dim() != 2 or w_dec.dim() != 2:
        raise BadInput(f"{where}: w_enc has shape {tuple(w_enc.shape)} and w_dec {tuple(w_dec.shape)}; xc imports "
                       f"single-layer dictionaries (2-D weights): the layouts of Gemma Scope 2's multi-layer "
                       f"crosscoders and CLTs are not publicly documented")
    d_in, F = w_enc.shape
    d_out = w_dec.shape[1]
    W_enc = tensor(tensors, "w_enc", (d_in, F), where)
    W_dec = tensor(tensors, "w_dec", (F, d_out), where)
    b_enc = tensor(tensors, "b_enc", (F,), where)
    b_dec = tensor(tensors, "b_dec", (d_out,), where)
    threshold = tensor(tensors, "threshold", (F,), where)
    transcoder = "hf_hook_point_out" in config or len(specs) == 2 or d_in != d_out
    sources = None if specs else config_sources(config, d_in, d_out, transcoder, where)
    if sources is None:
        widths = [d_in, d_out] if transcoder else [d_in]
        sources = sources_for(specs, widths, "sources" if transcoder else "source",
                              EXAMPLE + (" --source google/gemma-3-1b-pt:mlp_out:13" if transcoder else ""))
    names = [s.name for s in sources]
    model = Crosscoder(sources, F, "jumprelu", None, names[:1], names[-1:])
    with torch.no_grad():
        model.encoder_weight(names[0]).copy_(W_enc)
        model.b_enc.copy_(b_enc)
        model.decoder_weight(names[-1]).copy_(W_dec)
        model.decoder_bias(names[-1]).copy_(b_dec)
        model.set_thresholds(threshold.clamp(min=0))
    record = {"format": "gemma_scope", "path": str(path.resolve()), "file": weights.name,
              "kind": "transcoder" if transcoder else "SAE",
              "threshold": "per latent: f_i = ReLU(p_i) where p_i > threshold_i, else 0 (xc's JumpReLU; thresholds "
                           "below 0 become 0, the same rule)",
              "thresholds_below_zero": int((threshold < 0).sum()),
              "sources": {"input": names[0], "output": names[-1]},
              "sources_from": "--source" if specs else CONFIG}
    if config:
        record["config"] = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None)))}
    return Imported(model.eval(), record)
