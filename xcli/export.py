"""xc export: a crosscoder's feature dashboards as a Neuronpedia export, or its slices as SAELens SAEs.

    config = ExportConfig(checkpoint="xc.safetensors", store="acts.zarr", output="np-export")
    export(config)            # -> Path("np-export")

Neuronpedia has no crosscoder type, so every written source of the crosscoder
becomes one Neuronpedia source `{modelId}/{layer}-{set}`, all with the same
feature indices: latent i is feature i everywhere. What differs between them is
the decoder slice: logit lens, vector and neuron alignment. The activation
records are the same (one latent). Facts Neuronpedia has no column for (decoder
norm per source, relative norm, class from `xc classify`) go to `xc-latents.jsonl`
and, summarised, to each Source.notes.

Work is resumable: the statistics of passes 1 and 2 are saved in the output
folder; batch files are written atomically (activations first, then features,
whose presence marks the batch done), so a rerun with --resume skips them.
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

from xcli import console, files
from xcli import crosscoder as cc
from xcli import dashboards as db
from xcli import neuronpedia as npd
from xcli.errors import BadInput
from xcli.models import ModelSpec, resolve_device, resolve_folder
from xcli.store import ActivationStore, Source, open_store
from xcli.version import __version__

FORMATS = ("neuronpedia", "saelens")
MANIFEST = "xc-export.json"
SIDECAR = "xc-latents.jsonl"
MANIFEST_FORMAT, MANIFEST_VERSION = "xc-export", 1
LOGIT_ROWS = 10  # top and bottom tokens of the logit lens
ALIGNMENT_ROWS = 3
OUT_OF_RANGE = "<|outofrange|>"
# TransformerLens hook names of xc harvest's named sites (Neuronpedia's hookName).
HOOK_NAMES = {"resid_pre": "hook_resid_pre", "resid_post": "hook_resid_post",
              "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
# Tensor names that hold a model's unembedding (lm_head) or, when tied, its input embedding.
UNEMBEDDING_KEYS = ("lm_head.weight", "embed_out.weight")
EMBEDDING_KEYS = ("wte.weight", "embed_tokens.weight", "word_embeddings.weight", "embed_in.weight")
BYTE_LEVEL_MARKS = {"\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u2581": " "}  # Ġ Ċ ĉ ▁


@dataclass(frozen=True)
class ExportConfig:
    checkpoint: Path
    output: Path
    store: Path | None = None
    format: str = "neuronpedia"
    model_ids: tuple[str, ...] = ()
    """Neuronpedia model ids: `ID` (one model) or `MODEL=ID`; MODEL is a source's model name."""
    model_paths: tuple[str, ...] = ()
    """`MODEL=PATH`: where to read a model's unembedding and config (default: from the store)."""
    tokenizer: str | None = None
    set_name: str | None = None
    """Neuronpedia source set; default xc-{latents}, e.g. xc-16k."""
    features: str = "all"
    top_k: int = 20
    batch_size: int = 128
    """Features per batch file."""
    window: int = 64
    """Tokens per example: up to 3/4 of them before the example token."""
    classes: Path | None = None
    vectors: bool = False
    creator_id: str = npd.DEFAULT_CREATOR_ID
    creator_name: str = "xc"
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self):
        for name in ("checkpoint", "output", "store", "classes"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("model_ids", "model_paths"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.format not in FORMATS:
            raise BadInput(f"--format {self.format!r} is not known; use one of {', '.join(FORMATS)}")
        for name, low, high in (("top_k", 1, 1000), ("batch_size", 1, 65536), ("window", 1, npd.MAX_TOKENS)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise BadInput(f"--{name.replace('_', '-')} must be an integer from {low} to {high}, not {value!r}")
        if self.format == "neuronpedia" and self.store is None:
            raise BadInput("--store is needed for --format neuronpedia: the dashboards are read from activations")
        if self.set_name is not None and not valid_set_name(self.set_name):
            raise BadInput(f"--set-name {self.set_name!r} is not valid; use lowercase letters, digits, '-' and "
                           f"'_', starting and ending with a letter or digit (e.g. xc-16k)")
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.creator_id):
            raise BadInput(f"--creator-id {self.creator_id!r} is not a Neuronpedia user id (letters and digits)")
        if not self.creator_name.strip():
            raise BadInput("--creator-name must not be empty")
        resolve_device(self.device)
        if self.resume and self.overwrite:
            raise BadInput("--resume and --overwrite exclude each other: continue the export, or replace it")


def valid_set_name(name: str) -> bool:
    return bool(npd.SET_NAME.match(name)) and "--" not in name and "__" not in name and name != "neurons"


# -- inputs ------------------------------------------------------------------------

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


def model_folder(name: str, where: str, revision: str | None) -> Path:
    """The local folder of a model the export needs (its unembedding and facts); never the network."""
    try:
        return resolve_folder(ModelSpec(name, where, revision))[0]
    except BadInput as e:
        raise BadInput(f"{e}; or pass --model-path {name}=PATH") from None


def store_model_ids(store: ActivationStore) -> dict[str, tuple[str, str | None]]:
    """alias -> (path or hub id, revision), as xc harvest records them in the store."""
    models = store.meta.get("harvest", {}).get("models", [])
    return {m["alias"]: (m["id"], m.get("revision")) for m in models if isinstance(m, dict) and "alias" in m}


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise BadInput(f"{str(folder)!r} is not a Hugging Face model folder (no config.json)")
    config = json.loads(path.read_text())
    return config.get("text_config", config) if "text_config" in config else config


def weight_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({name: path for name in f.keys()})
    return out


def read_unembedding(folder: Path) -> torch.Tensor:
    """The model's unembedding W_U as (vocab, d_model) float32, read from its files without loading the model."""
    config = read_config(folder)
    tied = config.get("tie_word_embeddings", True)
    names = weight_files(folder)
    for suffixes in (UNEMBEDDING_KEYS, EMBEDDING_KEYS if tied else ()):
        found = sorted(n for n in names if any(n == s or n.endswith("." + s) for s in suffixes))
        if found:
            with safe_open(str(names[found[0]]), framework="pt") as f:
                return f.get_tensor(found[0]).float()
    try:  # weights in another layout (e.g. pytorch_model.bin): let transformers find the output embedding
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
        return model.get_output_embeddings().weight.detach().float()
    except Exception as e:
        raise BadInput(f"cannot read the unembedding of the model in {str(folder)!r} ({type(e).__name__}); "
                       f"the logit lens needs lm_head weights") from None


def model_facts(folder: Path) -> dict:
    config = read_config(folder)
    d = config.get("hidden_size") or config.get("n_embd") or config.get("d_model") or 0
    layers = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers") or 0
    neurons = config.get("intermediate_size") or config.get("n_inner") or (4 * d if "n_embd" in config else 0)
    return {"dimension": int(d), "layers": int(layers), "neurons": int(neurons)}


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = Path(name).expanduser()
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name, local_files_only=True)
    except Exception as e:
        raise BadInput(f"tokenizer {name!r} could not be loaded offline ({type(e).__name__}); pass --tokenizer "
                       f"with a local folder") from None


def token_strings(tokenizer) -> list[str]:
    """Display string of every token id (byte-level and sentencepiece marks become spaces/newlines)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    out = []
    for piece in pieces:
        text = piece or ""
        for mark, plain in BYTE_LEVEL_MARKS.items():
            text = text.replace(mark, plain)
        out.append(text)
    return out


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


# -- the sources of a Neuronpedia export ---------------------------------------------

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
        return root / "v1" / self.model_id / self.source_id


def plan_slices(model: cc.Crosscoder, set_name: str, model_ids: dict[str, str]) -> list[Slice]:
    """(modelId, sourceId) of every written source; sources sharing a (model, layer) get a __site suffix."""
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
    slices = []
    for s in written:
        if s.layer is None and "embed" not in s.site:
            raise BadInput(f"source {s.name!r} has no layer; a Neuronpedia source id starts with one")
        layer = "e" if s.layer is None else str(s.layer)
        slices.append(Slice(s, ids[s.model], f"{layer}-{set_name}",
                            f"blocks.{s.layer}.{HOOK_NAMES[s.site]}" if s.site in HOOK_NAMES and s.layer is not None
                            else None))
    counts = Counter((x.model_id, x.source_id) for x in slices)
    for x in slices:
        if counts[(x.model_id, x.source_id)] > 1:
            x.source_id = f"{x.source_id}__{re.sub(r'[^A-Za-z0-9_.-]', '-', x.source.site)}"
    counts = Counter((x.model_id, x.source_id) for x in slices)
    for x in slices:
        if counts[(x.model_id, x.source_id)] > 1:
            x.source_id = f"{x.source_id.split('__')[0]}__{x.source.name}"
    return slices


def default_set_name(n_latents: int) -> str:
    return f"xc-{n_latents // 1024}k" if n_latents % 1024 == 0 else f"xc-{n_latents}"


def decoder_raw(model: cc.Crosscoder, name: str, latents) -> torch.Tensor:
    """Decoder rows of `latents` for source `name` in raw activation units (per unit of latent activation)."""
    with torch.no_grad():
        w = model.decoder_weight(name)
        return (w[torch.as_tensor(latents, device=w.device)] / model.scale(name)).float().cpu()


# -- the Neuronpedia export ---------------------------------------------------------

@dataclass
class Plan:
    """Everything checked and loaded before the first byte is written."""

    config: ExportConfig
    model: cc.Crosscoder
    store: ActivationStore
    latents: np.ndarray
    slices: list[Slice]
    set_name: str
    strings: list[str]
    tokens: np.ndarray
    sequence_starts: np.ndarray
    classes: dict[int, dict]
    device: torch.device
    identity: dict

    @property
    def n_batches(self) -> int:
        return -(-len(self.latents) // self.config.batch_size)

    def batch_positions(self, b: int) -> np.ndarray:
        return np.arange(b * self.config.batch_size, min((b + 1) * self.config.batch_size, len(self.latents)))

    def batch_done(self, b: int) -> bool:
        return all((x.dir(self.config.output) / "features" / f"batch-{b}.jsonl.gz").exists() for x in self.slices)


def prepare(config: ExportConfig) -> Plan:
    """Read and check every input; raises BadInput before anything is written."""
    device = resolve_device(config.device)
    model = cc.load(config.checkpoint, device)
    store = open_store(config.store)
    if store.n_tokens == 0:
        raise BadInput(f"store {str(config.store)!r} holds no tokens")
    for s in model.sources:
        if s.name not in model.read:
            continue
        if s.name not in store.names:
            raise BadInput(f"store {str(config.store)!r} has no source {s.name!r}, which the crosscoder reads; "
                           f"it has: {', '.join(store.names)}")
        if store.source(s.name).d != s.d:
            raise BadInput(f"source {s.name!r} is {store.source(s.name).d} wide in the store but {s.d} in the "
                           f"checkpoint")
    ids = store.token_arrays()
    if ids is None:
        raise BadInput(f"store {str(config.store)!r} has no token arrays; dashboards need the tokens of every row")
    latents = parse_features(config.features, model.n_latents)
    set_name = config.set_name or default_set_name(model.n_latents)
    models = list(dict.fromkeys(s.model for s in model.sources))
    model_ids = parse_assignments(config.model_ids, "--model-id", models, allow_bare=True)
    model_paths = parse_assignments(config.model_paths, "--model-path", models, allow_bare=True)
    slices = plan_slices(model, set_name, model_ids)
    classes = read_classes(config.classes, model.n_latents) if config.classes else {}
    recorded = store_model_ids(store)
    folders, unembeddings = {}, {}
    for x in slices:
        name = x.source.model
        if name not in folders:
            where, revision = (model_paths[name], None) if name in model_paths else recorded.get(name, (name, None))
            folders[name] = model_folder(name, where, revision)
            unembeddings[name] = read_unembedding(folders[name]).to(device)  # once: every batch needs it
        x.folder, x.facts = folders[name], model_facts(folders[name])
        w_u = unembeddings[name]
        if w_u.shape[1] == x.source.d:
            x.unembedding = w_u
        else:
            console.warn(f"source {x.source.name!r} is {x.source.d} wide but the unembedding of {name!r} is "
                         f"{w_u.shape[1]} wide: no logit lens for it")
    tokenizer_name = config.tokenizer or store.meta.get("tokenizer") or str(folders[slices[0].source.model])
    strings = token_strings(load_tokenizer(tokenizer_name))
    if not store.complete:
        console.warn(f"store {str(config.store)!r} is incomplete: exporting its {store.n_tokens} committed tokens")
    identity = {
        "checkpoint": str(config.checkpoint.resolve()), "checkpoint_fingerprint": fingerprint(config.checkpoint),
        "store": str(Path(config.store).resolve()), "store_tokens": store.n_tokens,
        "features": config.features, "top_k": config.top_k, "batch_size": config.batch_size,
        "window": config.window, "vectors": config.vectors, "set_name": set_name,
        "creator_id": config.creator_id, "creator_name": config.creator_name,
        "classes": str(config.classes.resolve()) if config.classes else None,
        "sources": {x.source.name: f"{x.model_id}/{x.source_id}" for x in slices},
    }
    return Plan(config, model, store, latents, slices, set_name, strings,
                np.asarray(ids["tokens"]), db.sequence_starts(np.asarray(ids["sequence"])),
                classes, device, identity)


def fingerprint(path: Path) -> str:
    """Size and hash of the first and last MiB: cheap, and changes when a checkpoint is rewritten."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1 << 20)
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    return f"{size}:{hashlib.sha256(head + tail).hexdigest()[:16]}"


def output_state(config: ExportConfig, identity: dict) -> tuple[str, dict | None]:
    """'new', 'resume' or 'done' for the output folder; refuses what would clobber or mix runs."""
    out = config.output
    if not out.exists():
        files.check_output(out)
        return "new", None
    if config.overwrite:
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


def export(config: ExportConfig) -> Path:
    """Write the export at config.output and return its path."""
    if config.format == "saelens":
        from xcli.saelens import export_saelens

        return export_saelens(config)
    plan = prepare(config)
    state, manifest = output_state(config, plan.identity)
    out = config.output
    if manifest and manifest.get("complete") and all(plan.batch_done(b) for b in range(plan.n_batches)):
        console.info(f"{out} is complete and was exported with the same arguments: nothing to do")
        return out
    if state == "new" and out.exists():
        files.remove(out)  # --overwrite, now that every input is known to be good
    stamp = manifest["created_at"] if manifest else npd.created_at()
    out.mkdir(exist_ok=True)
    manifest = write_manifest(plan, stamp, complete=False)
    write_sidecar(plan)
    for x in plan.slices:
        write_metadata(plan, x, stamp)
    stats = dashboard_stats(plan)
    write_batches(plan, stats, stamp)
    write_manifest(plan, stamp, complete=True)
    files.remove(db.state_path(out))
    return out


def write_manifest(plan: Plan, stamp: str, complete: bool) -> dict:
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "neuronpedia", "complete": complete,
        "created_at": stamp, "created_by": f"xc {__version__}", "identity": plan.identity,
        "n_latents": plan.model.n_latents, "features": len(plan.latents), "n_tokens": plan.store.n_tokens,
        "sidecar": SIDECAR,
        "sources": [{"source": x.source.name, "model": x.source.model, "modelId": x.model_id,
                     "sourceId": x.source_id, "batches": plan.n_batches} for x in plan.slices],
        "conventions": {
            "activation_units": "the crosscoder's latent activations (decoder norms not folded in)",
            "logit_lens": "decoder row in raw activation units @ W_U^T, no final norm",
            "vector": "decoder row in raw activation units",
            "intervals": "5 equal-width intervals of (0, max]; zeros are in none; binContains is their share "
                         "of all tokens; 5 samples each by a fixed hash of (row, latent)",
            "frac_nonzero": "non-zero activations / all stored tokens",
        },
    }
    write_json(plan.config.output / MANIFEST, manifest)
    return manifest


def write_json(path: Path, value) -> None:
    with files.atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(value, indent=2, allow_nan=False) + "\n")


def latent_facts(model: cc.Crosscoder) -> tuple[np.ndarray, np.ndarray]:
    """Decoder norms (F, n_write) in normalised units, and each source's share of their sum."""
    with torch.no_grad():
        norms = model.decoder_norms().double().cpu().numpy()
    total = norms.sum(axis=1, keepdims=True)
    return norms, np.divide(norms, total, out=np.full_like(norms, np.nan), where=total > 0)


def write_sidecar(plan: Plan) -> None:
    """One row per exported latent: the crosscoder facts Neuronpedia has no column for."""
    norms, relative = latent_facts(plan.model)
    names = plan.model.write
    rows = []
    for i in plan.latents.tolist():
        rows.append({
            "index": i,
            "decoder_norm": dict(zip(names, npd.round_sig(norms[i]))),
            "relative_norm": {n: (None if np.isnan(v) else npd.round_sig([v])[0]) for n, v in zip(names, relative[i])},
            "class": plan.classes.get(i, {}).get("class"),
            "classify": _json_safe(plan.classes[i]) if i in plan.classes else None,
            "neuronpedia": [f"{x.model_id}/{x.source_id}/{i}" for x in plan.slices],
        })
    npd.write_jsonl(plan.config.output / SIDECAR, rows)


def _json_safe(value):
    """classify rows as they came, with non-finite numbers as null."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def source_notes(plan: Plan, x: Slice) -> str:
    counts = Counter(plan.classes.get(int(i), {}).get("class") or "unclassified" for i in plan.latents)
    classes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) if plan.classes else "not given"
    others = [f"{y.model_id}/{y.source_id}" for y in plan.slices if y is not x]
    return (f"Crosscoder exported by xc {__version__}: {plan.model.n_latents} latents ({plan.model.arch}) shared by "
            f"{len(plan.model.sources)} sources ({', '.join(s.name for s in plan.model.sources)}). Feature i here is "
            f"latent i, the same feature as index i in {', '.join(others) or 'no other source'}; this source shows "
            f"the decoder slice of {x.source.name} (model {x.source.model}, site {x.source.site}, layer "
            f"{x.source.layer}). Decoder norms per source, relative norms and classes per latent are in "
            f"{SIDECAR} beside the export. Classes: {classes}.")


def write_metadata(plan: Plan, x: Slice, stamp: str) -> None:
    c, folder = plan.config, x.dir(plan.config.output)
    folder.mkdir(parents=True, exist_ok=True)
    description = (f"Crosscoder {plan.model.n_latents} latents, {x.source.site} {x.source.layer}")[:128]
    creator = {"creatorId": c.creator_id}
    rows = {
        "release": {"name": plan.set_name, "description": f"xc crosscoder {plan.set_name}",
                    "descriptionShort": plan.set_name, "urls": [], "creatorName": c.creator_name,
                    "creatorNameShort": c.creator_name, **creator, "visibility": "PUBLIC", "isNewUi": False,
                    "featured": False, "defaultSourceSetName": plan.set_name, "defaultSourceId": x.source_id,
                    "defaultUmapSourceIds": [], "createdAt": stamp},
        "model": {"id": x.model_id, "displayName": x.model_id, "displayNameShort": x.model_id, **creator,
                  "instruct": x.model_id.endswith("-it"), "tlensId": None, "dimension": x.facts["dimension"],
                  "thinking": False, "visibility": "PUBLIC", "defaultSourceSetName": plan.set_name,
                  "defaultSourceId": x.source_id, "inferenceEnabled": False, "layers": x.facts["layers"],
                  "neuronsPerLayer": x.facts["neurons"], "owner": c.creator_name, "website": None,
                  "createdAt": stamp, "updatedAt": stamp},
        "sourceset": {"modelId": x.model_id, "name": plan.set_name, "description": description, "type": "Crosscoder",
                      "creatorName": c.creator_name, "creatorEmail": None, **creator, "urls": [],
                      "releaseName": plan.set_name, "visibility": "PUBLIC", "hasDashboards": True,
                      "allowInferenceSearch": False, "hasGraphs": False, "graphEnabled": False,
                      "similarityMatrixEnabled": False, "defaultRange": 1, "defaultShowBreaks": True,
                      "showDfa": False, "showCorrelated": False, "showHeadAttribution": False, "showUmap": False,
                      "createdAt": stamp},
        "source": {"id": x.source_id, "modelId": x.model_id, "setName": plan.set_name, **creator,
                   "visibility": "PUBLIC", "hasDashboards": True, "inferenceEnabled": False, "hasUmap": False,
                   "hasUmapLogSparsity": False, "hasUmapClusters": False,
                   "num_prompts": len(plan.sequence_starts), "num_tokens_in_prompt": _int_or_none(
                       plan.store.meta.get("context_length")),
                   "dataset": plan.store.meta["dataset"] if isinstance(plan.store.meta.get("dataset"), str) else None,
                   "notes": source_notes(plan, x), "createdAt": stamp},
    }
    for name, row in rows.items():
        npd.write_jsonl(folder / f"{name}.jsonl", [row])


def _int_or_none(value):
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def dashboard_stats(plan: Plan) -> db.DashboardStats:
    """Passes 1 and 2, each saved in the output so that a resumed export skips it."""
    path = db.state_path(plan.config.output)
    stats = db.DashboardStats.load(path) if path.exists() else None
    if stats is not None and (not np.array_equal(stats.latents, plan.latents) or stats.n_tokens != plan.store.n_tokens
                              or stats.top_values.shape[1] != plan.config.top_k):
        stats = None  # left by another run: start again
    if stats is None:
        stats = db.first_pass(plan.store, plan.model, plan.latents, plan.config.top_k, plan.device)
        stats.save(path)
    if stats.passes_done < 2:
        stats = db.second_pass(plan.store, plan.model, stats, plan.device)
        stats.save(path)
    return stats


def write_batches(plan: Plan, stats: db.DashboardStats, stamp: str) -> None:
    """Pass 3 and the batch files, in groups of batches whose windows fit WINDOW_BUDGET."""
    c = plan.config
    before = (3 * c.window) // 4
    after = c.window - before - 1
    per_batch = c.batch_size * (c.top_k + db.N_INTERVALS * db.PER_INTERVAL) * c.window
    group_size = max(1, db.WINDOW_BUDGET // per_batch)
    todo = [b for b in range(plan.n_batches) if not plan.batch_done(b)]
    if len(todo) < plan.n_batches:
        console.info(f"export: {plan.n_batches - len(todo)} of {plan.n_batches} batches already written")
    bar = console.progress(total=len(todo), desc="export: batches", unit="batch")
    for g in range(0, len(todo), group_size):
        group = todo[g:g + group_size]
        positions = np.concatenate([plan.batch_positions(b) for b in group])
        examples = db.choose_examples(stats, positions, plan.sequence_starts, plan.store.n_tokens, before, after)
        examples = db.read_windows(plan.store, plan.model, stats, examples, plan.device)
        for b in group:
            write_batch(plan, stats, examples, b, stamp)
            bar.update(1)
    bar.close()


def activation_records(plan: Plan, stats: db.DashboardStats, examples: db.Examples, position: int) -> list[dict]:
    """The examples of one latent as Activation fields shared by every source (no ids yet)."""
    n_tokens = stats.n_tokens
    top = float(stats.max_nonzero[position])
    records = []
    first, last = np.searchsorted(examples.position, [position, position + 1])
    for e in range(first, last):
        start, stop, row = int(examples.start[e]), int(examples.stop[e]), int(examples.row[e])
        values = npd.round_sig(examples.values[e, :stop - start])
        high = max(values)
        j = int(examples.interval[e])
        if j < 0:
            group, bins = "top", (-1, npd.round_sig([top])[0], -1)
        else:
            group = f"interval{j}"
            count = int(stats.interval_counts[position, j])
            bins = tuple(npd.round_sig([j * top / db.N_INTERVALS, (j + 1) * top / db.N_INTERVALS,
                                        count / n_tokens]))
        records.append({
            "group": group, "rank": int(examples.rank[e]),
            "tokens": [plan.strings[t] if t < len(plan.strings) else OUT_OF_RANGE
                       for t in plan.tokens[start:stop].tolist()],
            "values": values, "maxValue": high, "maxValueTokenIndex": values.index(high), "minValue": min(values),
            "binMin": bins[0], "binMax": bins[1], "binContains": bins[2],
            "qualifyingTokenIndex": row - start, "dataIndex": str(row),
        })
    return records


def logit_lens(x: Slice, directions: torch.Tensor, strings: list[str], device) -> list[dict]:
    """Top/bottom tokens and the histogram of each direction @ W_U^T (no final norm, as SAEDashboard)."""
    empty = {"pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
             "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": []}
    if x.unembedding is None:
        return [dict(empty) for _ in range(len(directions))]
    with torch.no_grad():
        logits = directions.to(device) @ x.unembedding.T
        n = min(LOGIT_ROWS, logits.shape[1])
        pos, neg = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        heights, centres = db.row_histograms(logits)
    pos_values, neg_values, centres = pos.values.cpu(), neg.values.cpu(), centres.cpu()
    pos_ids, neg_ids, heights = pos.indices.tolist(), neg.indices.tolist(), heights.tolist()

    def names(ids):
        return [strings[t] if t < len(strings) else OUT_OF_RANGE for t in ids]

    return [{"pos_str": names(pos_ids[i]), "pos_values": npd.round_sig(pos_values[i]),
             "neg_str": names(neg_ids[i]), "neg_values": npd.round_sig(neg_values[i]),
             "logits_hist_data_bar_heights": heights[i], "logits_hist_data_bar_values": npd.round_sig(centres[i])}
            for i in range(len(directions))]


def write_batch(plan: Plan, stats: db.DashboardStats, examples: db.Examples, b: int, stamp: str) -> None:
    """features/ and activations/ batch-b of every source: activations first, features mark it done."""
    c = plan.config
    positions = plan.batch_positions(b)
    latents = plan.latents[positions]
    records = {int(p): activation_records(plan, stats, examples, int(p)) for p in positions}
    for x in plan.slices:
        folder = x.dir(c.output)
        if (folder / "features" / f"batch-{b}.jsonl.gz").exists():
            continue  # written by an earlier run
        directions = decoder_raw(plan.model, x.source.name, latents)
        lens = logit_lens(x, directions, plan.strings, plan.device)
        activations, features = [], []
        for k, (p, i) in enumerate(zip(positions.tolist(), latents.tolist())):
            for r in records[p]:
                activations.append({
                    "id": npd.activation_id(x.model_id, x.source_id, i, r["group"], r["rank"]),
                    "modelId": x.model_id, "layer": x.source_id, "index": str(i),
                    **{key: v for key, v in r.items() if key not in ("group", "rank")},
                    "creatorId": c.creator_id, "createdAt": stamp,
                })
            features.append(feature_row(plan, stats, x, p, i, directions[k], lens[k], records[p], stamp))
        for sub in ("features", "activations"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if activations:
            npd.write_jsonl_gz(folder / "activations" / f"batch-{b}.jsonl.gz", activations)
        npd.write_jsonl_gz(folder / "features" / f"batch-{b}.jsonl.gz", features)


def feature_row(plan: Plan, stats: db.DashboardStats, x: Slice, p: int, i: int, direction: torch.Tensor,
                lens: dict, records: list[dict], stamp: str) -> dict:
    max_act = max((r["maxValue"] for r in records), default=0.0)
    heights, centres = [], []
    if int(stats.nonzero[p]) > 0:
        lo, hi = stats.bin_edges(p)
        heights = stats.hist[p].tolist()
        centres = npd.round_sig(lo + (np.arange(db.N_BINS) + 0.5) * (hi - lo) / db.N_BINS)
    d = direction.double()
    n_align = min(ALIGNMENT_ROWS, len(d))
    align = d.topk(n_align)
    l1 = float(d.abs().sum())
    return {
        "modelId": x.model_id, "layer": x.source_id, "index": str(i), "sourceSetName": plan.set_name,
        "creatorId": plan.config.creator_id, "createdAt": stamp, "maxActApprox": max_act,
        "hasVector": plan.config.vectors, "vector": npd.round_sig(d) if plan.config.vectors else [],
        "vectorLabel": None, "vectorDefaultSteerStrength": max_act, "hookName": x.hook_name,
        "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": align.indices.tolist(), "neuron_alignment_values": npd.round_sig(align.values),
        "neuron_alignment_l1": npd.round_sig(align.values.abs() / l1) if l1 > 0 else [0.0] * n_align,
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        **lens,
        "frac_nonzero": npd.round_sig([int(stats.nonzero[p]) / stats.n_tokens])[0],
        "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": centres,
        "decoder_weights_dist": [],
    }
