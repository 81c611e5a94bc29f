"""`xc export --format saelens`: each source slice of a crosscoder as an SAELens SAE folder.

    DIR/<source>/cfg.json                   SAELens v6 config (architecture, d_in, d_sae, metadata)
    DIR/<source>/sae_weights.safetensors    W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec [, threshold]
    DIR/<source>/xc-slice.json              where the slice came from, and what it leaves out

`SAE.load_from_disk(DIR/<source>)` loads a slice. A slice is a single-source SAE
in raw activation units: it encodes from its own source only, as if every other
source of the crosscoder were zero, and decodes only its own source.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from xcli import console, files
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.export.common import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    default_set_name,
    parse_assignments,
    plan_slices,
)
from xcli.export.config import ExportConfig
from xcli.version import __version__

SAELENS_VERSION = "6.0.0"  # the config layout written (cfg.json with a "metadata" object)


def saelens_slice(model: cc.Crosscoder, name: str) -> tuple[str, dict[str, torch.Tensor], dict]:
    """One source of the crosscoder as a single-source SAE in raw units: (architecture, weights, extra cfg).

    The slice encodes from this source alone (as if every other source were 0);
    ReLU -> "standard"; BatchTopK -> "jumprelu" with threshold_i = theta / sum_s ||d_i^s||
    (exactly our inference rule); TopK -> "topk" with each latent multiplied by
    sum_s ||d_i^s|| (so SAELens's plain top-k picks our latents; decode divides it back).
    """
    with torch.no_grad():
        scale = model.scale(name).float()
        W_enc = (model.encoder_weight(name).float() * scale).clone()
        b_enc = model.b_enc.float().clone()
        W_dec = (model.decoder_weight(name).float() / scale).clone()
        b_dec = (model.decoder_bias(name).float() / scale).clone()
        norm_sum = model.decoder_norms().sum(dim=1).float()
    tensors = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}
    if model.arch == "relu":
        return "standard", tensors, {}
    if model.arch == "batchtopk":
        theta = max(float(model.threshold), 0.0)
        dead = norm_sum <= 0
        threshold = torch.where(dead, torch.tensor(3.0e38), theta / torch.where(dead, 1.0, norm_sum))
        return "jumprelu", {**tensors, "threshold": threshold}, {}
    dead = norm_sum <= 0
    factor = torch.where(dead, 1.0, norm_sum)
    tensors["W_enc"] = torch.where(dead, 0.0, W_enc * factor)
    tensors["b_enc"] = torch.where(dead, -1.0e30, b_enc * factor)
    tensors["W_dec"] = W_dec / factor[:, None]
    return "topk", tensors, {"k": int(model.k)}


def export_saelens(config: ExportConfig) -> Path:
    """Every source the crosscoder both reads and writes, as an SAELens folder (cfg.json + sae_weights.safetensors)."""
    model = cc.load(config.checkpoint)
    files.check_output(config.output, overwrite=config.overwrite)
    names = [s.name for s in model.sources if s.name in model.read and s.name in model.write]
    for s in model.sources:
        if s.name not in names:
            console.warn(f"source {s.name!r} is only {'read' if s.name in model.read else 'written'}; "
                         f"no SAELens slice for it")
    if not names:
        raise BadInput("no source is both read and written by this crosscoder; a SAELens SAE needs both")
    set_name = config.set_name or default_set_name(model.n_latents)
    models = list(dict.fromkeys(s.model for s in model.sources))
    slices = {x.source.name: x for x in plan_slices(model, set_name, parse_assignments(
        config.model_ids, "--model-id", models, allow_bare=True))}
    with files.atomic_path(config.output, overwrite=config.overwrite) as tmp:
        tmp.mkdir()
        written = []
        for name in names:
            x = slices[name]
            arch, tensors, extra = saelens_slice(model, name)
            folder = tmp / name
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
            cfg = {"architecture": arch, "d_in": x.source.d, "d_sae": model.n_latents, "dtype": "float32",
                   "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                   "reshape_activations": "none", **extra,
                   "metadata": {"model_name": x.model_id, "hook_name": x.hook_name, "hook_layer": x.source.layer,
                                "hook_head_index": None, "prepend_bos": True,
                                "neuronpedia_id": f"{x.model_id}/{x.source_id}",
                                "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None}}
            (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
            (folder / "xc-slice.json").write_text(json.dumps({
                "crosscoder": str(config.checkpoint), "source": x.source.to_json(), "arch": model.arch,
                "read": model.read, "write": model.write,
                "latent_scale": "sum_s ||d_i^s|| (normalised units)" if arch == "topk" else None,
                "loses": "the other sources' encoder input; the other sources' reconstructions",
            }, indent=2) + "\n")
            written.append({"source": name, "folder": name, "architecture": arch,
                            "neuronpedia_id": f"{x.model_id}/{x.source_id}"})
        (tmp / MANIFEST).write_text(json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "saelens", "complete": True,
            "created_by": f"xc {__version__}", "checkpoint": str(config.checkpoint), "slices": written,
        }, indent=2) + "\n")
    return config.output
