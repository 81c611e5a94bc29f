"""What every export format shares: the manifest, the inputs, the slices of a crosscoder.

An export folder holds a manifest (xc-export.json) that records what was exported and
with which arguments; a rerun compares it to decide whether to skip, resume or refuse
(`output_state`). Each written source of the crosscoder is one slice: a Neuronpedia
source, or one SAELens SAE.
"""

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from xcli import files, strict_json
from xcli.crosscoder import model as cc
from xcli.errors import BadInput
from xcli.export import neuronpedia_schema as npd
from xcli.export.config import ExportConfig
from xcli.lm.config import ModelSpec
from xcli.lm.models import post_norm, resolve_folder
from xcli.source import Source, is_plain_name

MANIFEST = "xc-export.json"
SIDECAR = "xc-latents.jsonl"
MANIFEST_FORMAT, MANIFEST_VERSION = "xc-export", 1
# TransformerLens hook names of xc harvest's named sites (Neuronpedia's hookName, SAELens's hook_name).
HOOK_NAMES = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
              "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
# In a post-LN model (BERT) a block's output is normalised: TransformerLens's BertBlock names it
# hook_normalized_resid_post (its hook_resid_post is the sum before that LayerNorm, which xc does not
# store). A block's input, resid_pre, is the previous block's normalised output: hook_resid_pre still.
POST_NORM_HOOK_NAMES = {**HOOK_NAMES, "resid_post": "hook_normalized_resid_post"}


def parse_features(spec: str, n_latents: int) -> np.ndarray:
    """`all`, `7`, `0-99` (inclusive) or a comma list of those, as sorted unique latent indices."""
    spec = str(spec).strip()
    if spec == "all":
        return np.arange(n_latents)
    chosen = set()
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise BadInput(f"--features {spec!r} is not a latent list; use e.g. all, 7, 0-99 or 0-9,42")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if low > high or high >= n_latents:
            raise BadInput(f"--features {part.strip()!r} is outside the {n_latents} latents (0-{n_latents - 1})")
        chosen.update(range(low, high + 1))
    return np.array(sorted(chosen), dtype=np.int64)


def parse_assignments(values, option: str, models: list[str], allow_bare: bool) -> dict[str, str]:
    """`MODEL=VALUE` pairs (or one bare VALUE when the crosscoder reads one model)."""
    out = {}
    for text in values:
        name, sep, value = text.rpartition("=")
        if not sep:
            if not allow_bare or len(models) != 1:
                raise BadInput(f"{option} {text!r} must say which model: MODEL=VALUE with MODEL one of "
                               f"{', '.join(models)}")
            name, value = models[0], text
        if name not in models:
            raise BadInput(f"{option} {text!r} names model {name!r}; the crosscoder's models are "
                           f"{', '.join(models)}")
        if not value:
            raise BadInput(f"{option} {text!r} gives no value after '='")
        out[name] = value
    return out


def slug(text: str) -> str:
    """A Neuronpedia-safe lowercase id from a model name or path."""
    name = Path(text.rstrip("/")).name or text
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._") or "model"


def read_classes(path: Path, n_latents: int) -> dict[int, dict]:
    """latent -> its `xc classify` row (at least "latent" and "class"; other fields kept as they are)."""
    if not path.is_file():
        raise BadInput(f"--classes {str(path)!r} does not exist")
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise BadInput(f"--classes {str(path)!r} line {n} is not JSON; expected `xc classify` JSON lines") from None
        latent = row.get("latent") if isinstance(row, dict) else None
        if not isinstance(latent, int) or isinstance(latent, bool) or not 0 <= latent < n_latents:
            raise BadInput(f"--classes {str(path)!r} line {n}: 'latent' must be an integer in 0-{n_latents - 1}")
        if not isinstance(row.get("class"), (str, type(None))):
            raise BadInput(f"--classes {str(path)!r} line {n}: 'class' must be a string")
        out[latent] = {k: v for k, v in row.items() if k != "latent"}
    return out


@dataclass
class Slice:
    """One written source of the crosscoder, shown as one Neuronpedia source."""

    source: Source
    model_id: str
    source_id: str
    hook_name: str | None
    folder: Path | None = None
    facts: dict = field(default_factory=dict)
    unembedding: torch.Tensor | None = None

    def dir(self, root: Path) -> Path:
        """The slice's folder under the export `root`; never outside it (`files.inside`)."""
        return files.inside(root, root / "v1" / self.model_id / self.source_id)


def hook_name(source: Source, folder: Path | None = None) -> str | None:
    """The TransformerLens hook name of a named site; post-LN models (told by the model's config) differ."""
    names = POST_NORM_HOOK_NAMES if folder is not None and post_norm(folder) else HOOK_NAMES
    return f"blocks.{source.layer}.{names[source.site]}" if source.site in names and source.layer is not None \
        else None


def local_model_folder(name: str) -> Path | None:
    """The folder of a model named by path or hub id, when it is on this machine (local cache only); else None."""
    try:
        return resolve_folder(ModelSpec(name, name, None))[0]
    except BadInput:
        return None


def plan_slices(model: cc.Crosscoder, set_name: str, model_ids: dict[str, str],
                folders: dict[str, Path | None] | None = None) -> list[Slice]:
    """(modelId, sourceId) of every written source; sources sharing a (model, layer) get a __site suffix.

    `folders` (model -> its folder) tells post-LN models for the hook names; a model it does not
    name is looked up as a local path or a hub id in the local cache, and taken as pre-LN if absent.
    """
    written = [s for s in model.sources if s.name in model.write]
    ids = {m: model_ids.get(m, slug(m)) for m in dict.fromkeys(s.model for s in written)}
    for m, model_id in ids.items():
        if not npd.MODEL_ID.match(model_id):
            raise BadInput(f"--model-id {model_id!r} for model {m!r} is not valid; use lowercase letters, digits, "
                           f"'.', '-' and '_' (e.g. gemma-2-2b)")
    taken = Counter(ids.values())
    clash = [m for m, i in ids.items() if taken[i] > 1]
    if clash:
        raise BadInput(f"models {', '.join(clash)} would all be Neuronpedia model {ids[clash[0]]!r}; "
                       f"name them with --model-id MODEL=ID")
    folders = dict(folders or {})
    for m in ids:
        if m not in folders:
            folders[m] = local_model_folder(m)
    slices = []
    for s in written:
        if s.layer is None and "embed" not in s.site:
            raise BadInput(f"source {s.name!r} has no layer; a Neuronpedia source id starts with one")
        layer = "e" if s.layer is None else str(s.layer)
        slices.append(Slice(s, ids[s.model], f"{layer}-{set_name}", hook_name(s, folders[s.model])))
    counts = Counter((x.model_id, x.source_id) for x in slices)
    for x in slices:
        if counts[(x.model_id, x.source_id)] > 1:
            x.source_id = f"{x.source_id}__{re.sub(r'[^A-Za-z0-9_.-]', '-', x.source.site)}"
    counts = Counter((x.model_id, x.source_id) for x in slices)
    for x in slices:
        if counts[(x.model_id, x.source_id)] > 1:
            x.source_id = f"{x.source_id.split('__')[0]}__{x.source.name}"
    for x in slices:  # names come from the checkpoint: each must stay one folder name
        if not (is_plain_name(x.model_id) and is_plain_name(x.source_id)):
            raise BadInput(f"source {x.source.name!r} would be exported to folder {x.model_id}/{x.source_id!r}, "
                           f"which is not a plain folder name")
    return slices


def default_set_name(n_latents: int, crosscoder: str) -> str:
    """xc-{latents}-{first 8 hex digits of crosscoder_id}, e.g. xc-16k-3f9a0c21: unique per crosscoder."""
    width = f"{n_latents // 1024}k" if n_latents % 1024 == 0 else str(n_latents)
    return f"xc-{width}-{crosscoder[:8]}"


CROSSCODER_DEFINITION = ("format", "arch", "n_latents", "k", "sources", "read", "write")


def crosscoder_id(path: Path) -> str:
    """The checkpoint's identity: SHA-256 of its tensors (name, shape, float32 values) and of the metadata that
    defines the crosscoder (CROSSCODER_DEFINITION; not the xc version, training log or file name).

    The same crosscoder saved again gives the same id, any other crosscoder another one. Exports derive their
    default source-set name and their Activation ids from it, so two crosscoders never collide on a
    Neuronpedia instance and a re-export of one is idempotent. Reads the tensors one at a time.
    """
    meta = cc.read_metadata(path)
    digest = hashlib.sha256(json.dumps({k: meta.get(k) for k in CROSSCODER_DEFINITION}, sort_keys=True).encode())
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in sorted(f.keys()):
            tensor = f.get_tensor(name).float().contiguous()
            digest.update(f"\n{name}:{list(tensor.shape)}\n".encode())
            digest.update(tensor.numpy().reshape(-1).view(np.uint8))
    return digest.hexdigest()


def decoder_raw(model: cc.Crosscoder, name: str, latents) -> torch.Tensor:
    """Decoder rows of `latents` for source `name` in raw activation units (per unit of latent activation)."""
    with torch.no_grad():
        w = model.decoder_weight(name)
        return (w[torch.as_tensor(latents, device=w.device)] / model.scale(name)).float().cpu()


def fingerprint(path: Path) -> str:
    """Size and hash of the first and last MiB: cheap, and changes when a checkpoint is rewritten."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"


def export_inputs(config: ExportConfig) -> list:
    """The paths an export reads, which --overwrite must never replace."""
    return [config.checkpoint, config.store, config.classes]


def output_state(config: ExportConfig, identity: dict) -> tuple[str, dict | None]:
    """'new', 'resume' or 'done' for the output folder; refuses what would clobber or mix runs."""
    out = config.output
    if not out.exists():
        files.check_output(out)
        return "new", None
    if config.overwrite:
        files.check_replaceable(out, "export", export_inputs(config))
        return "new", None
    manifest_path = out / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BadInput(f"output {str(out)!r} already exists and is not an xc export; pass --overwrite to replace it")
    differ = sorted(k for k in set(identity) | set(manifest.get("identity", {}))
                    if identity.get(k) != manifest.get("identity", {}).get(k))
    if differ:
        raise BadInput(f"output {str(out)!r} was exported with other arguments ({', '.join(differ)} differ); "
                       f"pass --overwrite to replace it")
    if manifest.get("complete") and not config.resume:
        return "done", manifest
    if not config.resume:
        raise BadInput(f"output {str(out)!r} holds an unfinished export; pass --resume to continue it or "
                       f"--overwrite to start again")
    return "resume", manifest


def write_json(path: Path, value) -> None:
    with files.atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(strict_json.dumps(value, indent=2) + "\n")


def latent_facts(model: cc.Crosscoder) -> tuple[np.ndarray, np.ndarray]:
    """Decoder norms (F, n_write) in normalised units, and each source's share of their sum."""
    with torch.no_grad():
        norms = model.decoder_norms().double().cpu().numpy()
    total = norms.sum(axis=1, keepdims=True)
    return norms, np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)


def json_safe(value):
    """classify rows as they came, with non-finite numbers as null."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value
