"""`xc export --format saelens`: each source slice of a crosscoder as an SAELens SAE folder.

    DIR/<source>/cfg.json                   SAELens v6 config (architecture, d_in, d_sae, metadata)
    DIR/<source>/sae_weights.safetensors    W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec [, threshold]
    DIR/<source>/xc-slice.json              where the slice came from, and what it leaves out

`SAE.load_from_disk(DIR/<source>)` loads a slice. A slice is a single-source SAE
in raw activation units: it encodes from its own source only, as if every other
source of the crosscoder were zero, and decodes only its own source. Every slice
accepts SAELens's `fold_W_dec_norm()` (which SAEDashboard calls) without changing
what it computes.

The metadata says which model and how it was run, from the harvest record of the
store (--store, else the training store the checkpoint names, when it still exists).
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from xcli import console, files, strict_json
from xcli.crosscoder import model as cc
from xcli.data.store import open_store
from xcli.errors import BadInput
from xcli.export.common import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    crosscoder_id,
    default_set_name,
    export_inputs,
    local_model_folder,
    parse_assignments,
    plan_slices,
)
from xcli.export.config import ExportConfig
from xcli.version import __version__

SAELENS_VERSION = "6.0.0"  # the config layout written (cfg.json with a "metadata" object)
DEAD_BIAS = -1.0e30  # encoder bias of a latent that writes nothing to the slice's source: it never fires


def saelens_slice(model: cc.Crosscoder, name: str) -> tuple[str, dict[str, torch.Tensor], dict]:
    """One source of the crosscoder as a single-source SAE in raw units: (architecture, weights, extra cfg).

    The slice encodes from this source alone (as if every other source were 0).
    ReLU -> "standard", JumpReLU -> "jumprelu" with its thresholds, and BatchTopK -> "jumprelu"
    with threshold_i = theta / sum_s ||d_i^s|| (exactly our inference rule): latents are the
    crosscoder's, decoder rows its raw ones.
    TopK -> "topk" with rescale_acts_by_decoder_norm and unit decoder rows, already folded:
    latent i is f_i * r_i with r_i = ||d_i^this|| / c_this (its decoder norm in raw units), and the
    top k are picked by that. SAELens's folded TopK ranks by the norm of a latent's contribution to
    the source it reconstructs, so it cannot rank by our sum over sources: the pick equals the
    crosscoder's when the crosscoder writes one source (see `topk_selection_is_exact`).
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
    if model.arch == "jumprelu":  # the same rule on the same pre-activation: threshold_i = theta_i
        return "jumprelu", {**tensors, "threshold": model.thresholds().detach().float().clone()}, {}
    if model.arch == "batchtopk":
        theta = max(float(model.threshold), 0.0)
        dead = norm_sum <= 0
        threshold = torch.where(dead, torch.tensor(3.0e38), theta / torch.where(dead, 1.0, norm_sum))
        return "jumprelu", {**tensors, "threshold": threshold}, {}
    # TopK: fold r_i into the encoder so that W_dec has unit rows; fold_W_dec_norm then divides by 1.
    # A latent with no decoder row here gets a unit row all the same (SAELens divides by the norm) and
    # an encoder that never lets it fire: picked only when fewer than k latents are positive, it adds 0.
    r = W_dec.norm(dim=1)
    dead = r <= 0
    unit = torch.full_like(W_dec, W_dec.shape[1] ** -0.5)
    tensors["W_dec"] = torch.where(dead[:, None], unit, W_dec / torch.where(dead, 1.0, r)[:, None])
    tensors["W_enc"] = torch.where(dead, 0.0, W_enc * r)
    tensors["b_enc"] = torch.where(dead, DEAD_BIAS, b_enc * r)
    return "topk", tensors, {"k": int(model.k), "rescale_acts_by_decoder_norm": True}


def topk_selection_is_exact(model: cc.Crosscoder, name: str) -> bool:
    """Whether a TopK slice picks the crosscoder's latents: r_i proportional to sum_s ||d_i^s|| over live latents."""
    with torch.no_grad():
        norm_sum = model.decoder_norms().sum(dim=1).double()
        r = model.decoder_weight(name).double().norm(dim=1)
    live = norm_sum > 0
    if not bool((r[live] > 0).all()):
        return False
    ratio = norm_sum[live] / r[live]
    return bool(live.sum() == 0 or (ratio.max() - ratio.min()) <= 1e-6 * ratio.max())


# -- what the harvest recorded ------------------------------------------------------------------

def harvest_record(config: ExportConfig, model: cc.Crosscoder) -> tuple[dict, dict, str | None]:
    """(store attributes, the checkpoint's record of its training store, where they came from).

    From --store when given; else the first training store the checkpoint names that still opens."""
    recorded = model.metadata.get("store") if isinstance(getattr(model, "metadata", None), dict) else None
    recorded = [r for r in (recorded if isinstance(recorded, list) else [recorded]) if isinstance(r, dict)]
    if config.store is not None:
        return open_store(config.store).meta, (recorded[0] if recorded else {}), str(config.store)
    for r in recorded:
        path = r.get("path")
        if isinstance(path, str) and Path(path).is_dir():
            try:
                return open_store(path).meta, r, path
            except BadInput:
                continue
    return {}, (recorded[0] if recorded else {}), None


def model_name(alias: str, harvested: dict[str, str], explicit: dict[str, str], tokenizer: str | None,
               one_model: bool) -> tuple[str, str]:
    """SAELens's model_name (what TransformerLens and SAEDashboard load), and where it came from.

    A hub id from the harvest record; else --model-id; else the harvested folder's name; else, for a
    crosscoder of one model, the tokenizer the checkpoint's store records (harvest's model); else the
    model name in the checkpoint (a path's last part)."""
    def is_path(text):
        return Path(text).expanduser().is_absolute() or text.startswith((".", "~"))

    recorded = harvested.get(alias)
    if recorded and not is_path(recorded):
        return recorded, "harvest record (hub id)"
    if alias in explicit:
        return explicit[alias], "--model-id"
    if recorded:
        return Path(recorded.rstrip("/")).name, "harvest record (folder name)"
    if one_model and tokenizer:
        return (Path(tokenizer.rstrip("/")).name if is_path(tokenizer) else tokenizer), "checkpoint's store tokenizer"
    return (Path(alias.rstrip("/")).name if is_path(alias) else alias), "checkpoint source"


def run_metadata(meta: dict, recorded: dict) -> tuple[dict, dict]:
    """SAELens metadata about how the model was run, and the facts behind it (for xc-slice.json)."""
    packing = meta.get("packing") if isinstance(meta.get("packing"), dict) else None
    out, facts = {}, {}
    if packing is not None:
        # xc harvest starts every window with what the tokenizer puts before a text (BOS), or BOS itself.
        out["prepend_bos"] = bool(packing.get("prefix"))
        facts["prepend_bos"] = f"harvest packing: window prefix {packing.get('prefix')}"
    else:
        out["prepend_bos"] = True  # SAELens needs a value; TransformerLens's default, and xc harvest's
        facts["prepend_bos"] = "not recorded (no harvest packing in a store); TransformerLens's default assumed"
    stored = meta.get("special_tokens_stored")
    if isinstance(stored, bool):
        out["exclude_special_tokens"] = not stored  # xc harvest drops rows of special tokens unless asked
        facts["special_tokens_stored"] = stored
    context = meta.get("context_length", recorded.get("context_length"))
    if isinstance(context, int):
        out["context_size"] = context
    dataset = meta.get("dataset", recorded.get("dataset"))
    if isinstance(dataset, str):
        facts["dataset"] = dataset
        if "harvest" in meta and dataset != "-" and not Path(dataset).is_absolute():
            out["dataset_path"] = dataset  # a dataset name harvested; a local corpus means nothing elsewhere
    return out, facts


def export_saelens(config: ExportConfig) -> Path:
    """Every source the crosscoder both reads and writes, as an SAELens folder (cfg.json + sae_weights.safetensors)."""
    model = cc.load(config.checkpoint)
    files.check_output(config.output, overwrite=config.overwrite)
    if config.overwrite:
        files.check_replaceable(config.output, "export", export_inputs(config))
    names = [s.name for s in model.sources if s.name in model.read and s.name in model.write]
    for s in model.sources:
        if s.name not in names:
            console.warn(f"source {s.name!r} is only {'read' if s.name in model.read else 'written'}; "
                         f"no SAELens slice for it")
    if not names:
        raise BadInput("no source is both read and written by this crosscoder; a SAELens SAE needs both")
    set_name = config.set_name or default_set_name(model.n_latents, crosscoder_id(config.checkpoint))
    models = list(dict.fromkeys(s.model for s in model.sources))
    explicit = parse_assignments(config.model_ids, "--model-id", models, allow_bare=True)
    meta, recorded, record_from = harvest_record(config, model)
    harvested = {m["alias"]: (m.get("id"), m.get("revision")) for m in meta.get("harvest", {}).get("models", [])
                 if isinstance(m, dict) and isinstance(m.get("alias"), str) and isinstance(m.get("id"), str)}
    # The harvested model's folder, where it is on this machine, tells post-LN models' hook names.
    folders = {alias: local_model_folder(where) for alias, (where, _) in harvested.items() if alias in models}
    slices = {x.source.name: x for x in plan_slices(model, set_name, explicit, folders)}
    run, run_facts = run_metadata(meta, recorded)
    with files.atomic_path(config.output, overwrite=config.overwrite) as tmp:
        tmp.mkdir()
        written = []
        for name in names:
            x = slices[name]
            arch, tensors, extra = saelens_slice(model, name)
            name_of_model, name_from = model_name(x.source.model, {a: i for a, (i, _) in harvested.items()},
                                                  explicit, recorded.get("tokenizer"), len(models) == 1)
            folder = files.inside(tmp, tmp / name)  # source names come from the checkpoint
            folder.mkdir()
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
            cfg = {"architecture": arch, "d_in": x.source.d, "d_sae": model.n_latents, "dtype": "float32",
                   "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
                   "reshape_activations": "none", **extra,
                   "metadata": {"model_name": name_of_model, "hook_name": x.hook_name, "hook_layer": x.source.layer,
                                "hook_head_index": None, **run,
                                "neuronpedia_id": f"{x.model_id}/{x.source_id}",
                                "sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": None}}
            (folder / "cfg.json").write_text(strict_json.dumps(cfg, indent=2) + "\n")
            model_id, revision = harvested.get(x.source.model, (None, x.source.revision))
            (folder / "xc-slice.json").write_text(strict_json.dumps({
                "crosscoder": str(config.checkpoint), "source": x.source.to_json(), "arch": model.arch,
                "read": model.read, "write": model.write,
                "latents": ("f_i * ||d_i^s|| / c_s (the crosscoder's latent times its decoder norm here, raw units)"
                            if arch == "topk" else "the crosscoder's latents"),
                "topk_selection": None if arch != "topk" else (
                    "the crosscoder's" if topk_selection_is_exact(model, name) else
                    "by f_i * ||d_i^s|| (this source's decoder norm), where the crosscoder ranks by "
                    "f_i * sum_t ||d_i^t||: a latent's pick can differ"),
                "loses": "the other sources' encoder input; the other sources' reconstructions",
                "model": {"name": name_of_model, "from": name_from, "harvested": model_id, "revision": revision},
                "harvest": {"store": record_from, **run_facts},
            }, indent=2) + "\n")
            written.append({"source": name, "folder": name, "architecture": arch,
                            "neuronpedia_id": f"{x.model_id}/{x.source_id}"})
        (tmp / MANIFEST).write_text(strict_json.dumps({
            "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "saelens", "complete": True,
            "created_by": f"xc {__version__}", "checkpoint": str(config.checkpoint), "slices": written,
        }, indent=2) + "\n")
    return config.output
