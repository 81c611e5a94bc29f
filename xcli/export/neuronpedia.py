"""The Neuronpedia export: a crosscoder's feature dashboards in Neuronpedia's v1 layout.

Neuronpedia has no crosscoder type, so every written source of the crosscoder
becomes one Neuronpedia source `{modelId}/{layer}-{set}`, all with the same
feature indices: latent i is feature i everywhere. What differs between them is
the decoder slice: logit lens, vector and neuron alignment. The activation
records are the same (one latent). Facts Neuronpedia has no column for (decoder
norm per source, relative norm, class from `xc classify`) go to `xc-latents.jsonl`
and, summarised, to each Source.notes. The layout and the importer's rules are
xcli.export.neuronpedia_schema; the dashboard statistics are xcli.export.dashboards.

Work is resumable: the statistics of passes 1 and 2 are saved in the output
folder; batch files are written atomically (activations first, then features,
whose presence marks the batch done), so a rerun with --resume skips them.
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xcli import console, files, remote
from xcli.crosscoder import model as cc
from xcli.data.corpus import Packing
from xcli.data.store import ActivationStore, open_store
from xcli.devices import resolve_device
from xcli.errors import BadInput, XcError
from xcli.export import dashboards as db
from xcli.export import neuronpedia_schema as npd
from xcli.export.common import (
    MANIFEST,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    SIDECAR,
    Slice,
    crosscoder_id,
    decoder_raw,
    default_set_name,
    fingerprint,
    hook_name,
    json_safe,
    latent_facts,
    output_state,
    parse_assignments,
    parse_features,
    plan_slices,
    read_classes,
    write_json,
)
from xcli.export.config import ExportConfig
from xcli.lm.config import ModelSpec
from xcli.lm.models import load_tokenizer, model_facts, read_unembedding, resolve_folder
from xcli.version import __version__

LOGIT_ROWS = 10  # top and bottom tokens of the logit lens
ALIGNMENT_ROWS = 3
OUT_OF_RANGE = "<|outofrange|>"
# Space and newline marks of byte-level and SentencePiece vocabularies, for a tokenizer that cannot decode.
BYTE_LEVEL_MARKS = {"\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u2581": " "}  # Ġ Ċ ĉ ▁


# -- inputs ------------------------------------------------------------------------


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


def round_sig(values, digits: int = 6) -> list[float]:
    """Numbers rounded to `digits` significant digits, as short JSON floats (vectorised)."""
    a = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(a).all():
        raise XcError("a NaN or inf reached an export row; the checkpoint or the model weights hold non-finite "
                      "numbers")
    out = a.copy()
    nonzero = a != 0
    exponent = np.zeros(a.shape, dtype=np.int64)
    exponent[nonzero] = np.floor(np.log10(np.abs(a[nonzero]))).astype(np.int64)
    for e in np.unique(exponent[nonzero]):
        sel = nonzero & (exponent == e)
        out[sel] = np.round(a[sel], int(digits - 1 - e))
    return out.tolist()


def tokenizer_named(name: str):
    """The tokenizer in a local folder or the local Hugging Face cache, with the option that changes it."""
    try:
        return load_tokenizer(ModelSpec.parse(name, allow_alias=False))
    except BadInput as e:
        raise BadInput(f"tokenizer {name!r} could not be loaded offline: {e}; pass --tokenizer with a local folder") from None


def token_texts(strings: list[str], ids: list[int]) -> list[str]:
    """The strings of token ids; an id outside the tokenizer (a store is untrusted, and a model's
    vocabulary may be wider than its tokenizer's) shows as OUT_OF_RANGE instead of indexing."""
    return [strings[t] if 0 <= t < len(strings) else OUT_OF_RANGE for t in ids]


def token_strings(tokenizer) -> list[str]:
    """Display string of every token id: the text the token adds when the tokenizer decodes it.

    Neuronpedia shows one string per token and joins them, so a token's string is what it
    adds after other text: each id is decoded after an anchor (the tokens of "a") and the
    anchor's text is taken off. So byte-level pieces (GPT-2, Llama 3, Qwen, NeoX: `ĠcafÃ©`)
    show their text (` café`), SentencePiece's `▁` and WordPiece's word starts a space (which
    decoders drop from a text's first token), and `##` continuations nothing. A token that is
    an incomplete UTF-8 sequence shows its bytes decoded with replacement (`�`). Special
    tokens show as written. A tokenizer without a decoder shows its pieces.
    """
    n = len(tokenizer)
    pieces = [piece or "" for piece in tokenizer.convert_ids_to_tokens(list(range(n)))]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        anchor = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    except Exception:  # a tokenizer-like object that cannot encode: no anchor
        anchor = []
    if backend is not None:
        if backend.decoder is None:
            return pieces  # no decoder: decode() would only join the pieces with spaces
        head = backend.decode(anchor, skip_special_tokens=False)
        texts = backend.decode_batch([anchor + [i] for i in range(n)], skip_special_tokens=False)
    elif hasattr(tokenizer, "convert_tokens_to_string") and anchor:  # a tokenizer without a Rust backend
        anchor_pieces = tokenizer.convert_ids_to_tokens(anchor)
        head = tokenizer.convert_tokens_to_string(anchor_pieces)
        texts = [tokenizer.convert_tokens_to_string([*anchor_pieces, p]) if p else "" for p in pieces]
    else:  # vocabulary only: undo the usual space and newline marks
        texts, head = [], ""
        for piece in pieces:
            for mark, plain in BYTE_LEVEL_MARKS.items():
                piece = piece.replace(mark, plain)
            texts.append(piece)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    out = []
    for i, (piece, text) in enumerate(zip(pieces, texts)):
        if i in special or not piece:
            out.append(piece)
        elif text.startswith(head):
            out.append(text[len(head):])
        else:  # the decoder changed the anchor (it never should): the token decoded alone
            out.append(tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return out


# -- the sources of a Neuronpedia export ---------------------------------------------


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
    context_starts: np.ndarray | None = None  # first row of every document piece of a window (None: sequence_starts)
    per_model: dict[str, tuple[np.ndarray, list[str]]] | None = None  # aligned store: each model's tokens, strings

    def tokens_of(self, x: Slice) -> tuple[np.ndarray, list[str]]:
        """The token ids of the store's rows and the token strings to show them with, for slice x's model."""
        return self.per_model[x.source.model] if self.per_model is not None else (self.tokens, self.strings)

    @property
    def batch_size(self) -> int:
        """Features per batch file: --batch-size, raised so that no folder holds more than npd.MAX_FILES files."""
        return npd.features_per_file(self.config.batch_size, len(self.latents))

    @property
    def n_batches(self) -> int:
        return -(-len(self.latents) // self.batch_size)

    def batch_positions(self, b: int) -> np.ndarray:
        return np.arange(b * self.batch_size, min((b + 1) * self.batch_size, len(self.latents)))

    @property
    def crosscoder(self) -> str:
        """The checkpoint's identity (common.crosscoder_id): Activation ids derive from it."""
        return self.identity["crosscoder"]

    @property
    def temp_dir(self) -> Path:
        """Where batch and metadata files are written before their rename: beside v1/, never inside."""
        return self.config.output / npd.TEMP_DIR

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
    crosscoder = crosscoder_id(config.checkpoint)
    set_name = config.set_name or default_set_name(model.n_latents, crosscoder)
    per_file = npd.features_per_file(config.batch_size, len(latents))
    if per_file != config.batch_size:
        console.warn(f"--batch-size {config.batch_size} would put {-(-len(latents) // config.batch_size)} files in "
                     f"a folder, and Neuronpedia's importer lists at most {npd.MAX_FILES}: writing {per_file} "
                     f"features per file")
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
        x.hook_name = hook_name(x.source, folders[name])  # the folder found here tells post-LN models
        w_u = unembeddings[name]
        if w_u.shape[1] == x.source.d:
            x.unembedding = w_u
        else:
            console.warn(f"source {x.source.name!r} is {x.source.d} wide but the unembedding of {name!r} is "
                         f"{w_u.shape[1]} wide: no logit lens for it")
    tokenizer_name = config.tokenizer or store.meta.get("tokenizer") or str(folders[slices[0].source.model])
    tokenizer = tokenizer_named(tokenizer_name)
    strings = token_strings(tokenizer)
    if not store.complete:
        console.warn(f"store {str(config.store)!r} is incomplete: exporting its {store.n_tokens} committed tokens")
    identity = {
        "checkpoint": str(config.checkpoint.resolve()), "checkpoint_fingerprint": fingerprint(config.checkpoint),
        "crosscoder": crosscoder,
        "store": remote.resolved(config.store), "store_tokens": store.n_tokens,
        "features": config.features, "top_k": config.top_k, "batch_size": config.batch_size,
        "window": config.window, "vectors": config.vectors, "set_name": set_name,
        "creator_id": config.creator_id, "creator_name": config.creator_name,
        "classes": str(config.classes.resolve()) if config.classes else None,
        "sources": {x.source.name: f"{x.model_id}/{x.source_id}" for x in slices},
    }
    tokens, sequence = np.asarray(ids["tokens"]), np.asarray(ids["sequence"])
    if store.alignment is not None:  # models with different tokenizers: each shown with its own tokens
        aligned = store.aligned_arrays()
        per_model = {name: (np.asarray(aligned[f"aligned/{name}/tokens"]), token_strings(tokenizer_named(str(folder))))
                     for name, folder in folders.items()}
        # A window of an aligned store is one document piece; positions skip the tokens inside spans.
        return Plan(config, model, store, latents, slices, set_name, strings, tokens, db.sequence_starts(sequence),
                    classes, device, identity, per_model=per_model)
    separator, prefix, suffix = document_marks(store, tokenizer)
    return Plan(config, model, store, latents, slices, set_name, strings, tokens, db.sequence_starts(sequence),
                classes, device, identity, context_starts=db.context_starts(
                    sequence, np.asarray(ids["position"]), tokens, separator, len(prefix), len(suffix)))


def document_marks(store: ActivationStore, tokenizer) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """The ids put between two documents, before every window (BOS, CLS) and after it (SEP).

    As the store records them (attrs["xc"]["packing"]), else as xc harvest would pack with the
    tokenizer (stores written by other tools)."""
    packing = store.meta.get("packing")
    if isinstance(packing, dict) and isinstance(packing.get("separator"), list):
        return tuple(tuple(int(t) for t in packing.get(k) or ()) for k in ("separator", "prefix", "suffix"))
    try:
        packing = Packing.for_tokenizer(tokenizer, 1 << 30)
    except Exception:  # a tokenizer that cannot encode: only position gaps mark documents
        return (), (), ()
    return packing.separator, packing.prefix, packing.suffix


def export_neuronpedia(config: ExportConfig) -> Path:
    """Write the Neuronpedia export at config.output and return its path."""
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
    npd.remove_temp_files(out)  # what a killed run left half-written
    manifest = write_manifest(plan, stamp, complete=False)
    write_sidecar(plan)
    for x in plan.slices:
        write_metadata(plan, x, stamp)
    stats = dashboard_stats(plan)
    write_batches(plan, stats, stamp)
    write_manifest(plan, stamp, complete=True)
    files.remove(db.state_path(out))
    npd.remove_temp_files(out)
    return out


def write_manifest(plan: Plan, stamp: str, complete: bool) -> dict:
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "kind": "neuronpedia", "complete": complete,
        "created_at": stamp, "created_by": f"xc {__version__}", "identity": plan.identity,
        "n_latents": plan.model.n_latents, "features": len(plan.latents), "n_tokens": plan.store.n_tokens,
        "sidecar": SIDECAR, "features_per_file": plan.batch_size,
        "sources": [{"source": x.source.name, "model": x.source.model, "modelId": x.model_id,
                     "sourceId": x.source_id, "batches": plan.n_batches} for x in plan.slices],
        "conventions": {
            "activation_units": "the crosscoder's latent activations (decoder norms not folded in)",
            "logit_lens": "decoder row in raw activation units @ W_U^T, no final norm",
            "vector": "decoder row in raw activation units",
            "intervals": "5 equal-width intervals of (0, max]; zeros are in none; binContains is their share "
                         "of all tokens; 5 samples each by a fixed hash of (row, latent)",
            "frac_nonzero": "non-zero activations / all stored tokens",
            "ids": "set name xc-{latents}-{crosscoder[:8]} unless --set-name; Activation.id = 'c' + sha1(crosscoder/"
                   "modelId/sourceId/feature/group/rank)[:24], crosscoder = identity.crosscoder",
        },
    }
    write_json(plan.config.output / MANIFEST, manifest)
    return manifest


def write_sidecar(plan: Plan) -> None:
    """One row per exported latent: the crosscoder facts Neuronpedia has no column for."""
    norms, relative = latent_facts(plan.model)
    names = plan.model.write
    rows = []
    for i in plan.latents.tolist():
        rows.append({
            "index": i,
            "decoder_norm": dict(zip(names, round_sig(norms[i]))),
            "relative_norm": {n: (None if np.isnan(v) else round_sig([v])[0]) for n, v in zip(names, relative[i])},
            "class": plan.classes.get(i, {}).get("class"),
            "classify": json_safe(plan.classes[i]) if i in plan.classes else None,
            "neuronpedia": [f"{x.model_id}/{x.source_id}/{i}" for x in plan.slices],
        })
    npd.write_jsonl(plan.config.output / SIDECAR, rows)


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
    # The release, model and source-set rows are the same in every folder that holds them: the importer creates
    # each once, from whichever folder it reads first. The model names no default source set or source: it is
    # created before them, so those foreign keys would fail on a fresh instance.
    description = (f"xc crosscoder {plan.crosscoder[:8]}: {plan.model.n_latents} latents ({plan.model.arch}) shared "
                   f"by {len(plan.model.sources)} sources")[:128]
    creator = {"creatorId": c.creator_id}
    rows = {
        "release": {"name": plan.set_name, "description": f"xc crosscoder {plan.set_name}",
                    "descriptionShort": plan.set_name, "urls": [], "creatorName": c.creator_name,
                    "creatorNameShort": c.creator_name, **creator, "visibility": "PUBLIC", "isNewUi": False,
                    "featured": False, "defaultSourceSetName": plan.set_name, "defaultSourceId": None,
                    "defaultUmapSourceIds": [], "createdAt": stamp},
        "model": {"id": x.model_id, "displayName": x.model_id, "displayNameShort": x.model_id, **creator,
                  "instruct": x.model_id.endswith("-it"), "tlensId": None, "dimension": x.facts["dimension"],
                  "thinking": False, "visibility": "PUBLIC", "defaultSourceSetName": None,
                  "defaultSourceId": None, "inferenceEnabled": False, "layers": x.facts["layers"],
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
                   "dataset": public_dataset(plan.store.meta.get("dataset")),
                   "notes": source_notes(plan, x), "createdAt": stamp},
    }
    for name, row in rows.items():
        npd.write_jsonl(folder / f"{name}.jsonl", [row], plan.temp_dir)


def public_dataset(dataset) -> str | None:
    """Source.dataset: a dataset name as it is, a local corpus by its file name (never its path), stdin as null."""
    if not isinstance(dataset, str) or dataset in ("", "-"):
        return None
    if npd.local_path(dataset):
        return Path(dataset).name or None
    return dataset


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
    per_batch = plan.batch_size * (c.top_k + db.N_INTERVALS * db.PER_INTERVAL) * c.window
    group_size = max(1, db.WINDOW_BUDGET // per_batch)
    todo = [b for b in range(plan.n_batches) if not plan.batch_done(b)]
    if len(todo) < plan.n_batches:
        console.info(f"export: {plan.n_batches - len(todo)} of {plan.n_batches} batches already written")
    bar = console.progress(total=len(todo), desc="export: batches", unit="batch")
    for g in range(0, len(todo), group_size):
        group = todo[g:g + group_size]
        positions = np.concatenate([plan.batch_positions(b) for b in group])
        runs = plan.sequence_starts if plan.context_starts is None else plan.context_starts
        examples = db.choose_examples(stats, positions, runs, plan.store.n_tokens, before, after)
        examples = db.read_windows(plan.store, plan.model, stats, examples, plan.device)
        for b in group:
            write_batch(plan, stats, examples, b, stamp)
            bar.update(1)
    bar.close()


def activation_records(plan: Plan, stats: db.DashboardStats, examples: db.Examples, position: int,
                       tokens: np.ndarray, strings: list[str]) -> list[dict]:
    """The examples of one latent as Activation fields shared by every source of one tokenizer (no ids yet)."""
    n_tokens = stats.n_tokens
    top = float(stats.max_nonzero[position])
    records = []
    first, last = np.searchsorted(examples.position, [position, position + 1])
    for e in range(first, last):
        start, stop, row = int(examples.start[e]), int(examples.stop[e]), int(examples.row[e])
        values = round_sig(examples.values[e, :stop - start])
        high = max(values)
        j = int(examples.interval[e])
        if j < 0:
            group, bins = "top", (-1, round_sig([top])[0], -1)
        else:
            group = f"interval{j}"
            count = int(stats.interval_counts[position, j])
            bins = tuple(round_sig([j * top / db.N_INTERVALS, (j + 1) * top / db.N_INTERVALS,
                                        count / n_tokens]))
        records.append({
            "group": group, "rank": int(examples.rank[e]),
            "tokens": token_texts(strings, tokens[start:stop].tolist()),
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

    return [{"pos_str": token_texts(strings, pos_ids[i]), "pos_values": round_sig(pos_values[i]),
             "neg_str": token_texts(strings, neg_ids[i]), "neg_values": round_sig(neg_values[i]),
             "logits_hist_data_bar_heights": heights[i], "logits_hist_data_bar_values": round_sig(centres[i])}
            for i in range(len(directions))]


def write_batch(plan: Plan, stats: db.DashboardStats, examples: db.Examples, b: int, stamp: str) -> None:
    """features/ and activations/ batch-b of every source: activations first, features mark it done."""
    c = plan.config
    positions = plan.batch_positions(b)
    latents = plan.latents[positions]
    by_model = {}
    for x in plan.slices:
        key = x.source.model if plan.per_model is not None else None  # one set of records per tokenizer
        if key not in by_model:
            by_model[key] = {int(p): activation_records(plan, stats, examples, int(p), *plan.tokens_of(x))
                             for p in positions}
        records = by_model[key]
        folder = x.dir(c.output)
        if (folder / "features" / f"batch-{b}.jsonl.gz").exists():
            continue  # written by an earlier run
        directions = decoder_raw(plan.model, x.source.name, latents)
        lens = logit_lens(x, directions, plan.tokens_of(x)[1], plan.device)
        activations, features = [], []
        for k, (p, i) in enumerate(zip(positions.tolist(), latents.tolist())):
            for r in records[p]:
                activations.append({
                    "id": npd.activation_id(plan.crosscoder, x.model_id, x.source_id, i, r["group"], r["rank"]),
                    "modelId": x.model_id, "layer": x.source_id, "index": str(i),
                    **{key: v for key, v in r.items() if key not in ("group", "rank")},
                    "creatorId": c.creator_id, "createdAt": stamp,
                })
            features.append(feature_row(plan, stats, x, p, i, directions[k], lens[k], records[p], stamp))
        for sub in ("features", "activations"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        if activations:
            npd.write_jsonl_gz(folder / "activations" / f"batch-{b}.jsonl.gz", activations, plan.temp_dir)
        npd.write_jsonl_gz(folder / "features" / f"batch-{b}.jsonl.gz", features, plan.temp_dir)


def feature_row(plan: Plan, stats: db.DashboardStats, x: Slice, p: int, i: int, direction: torch.Tensor,
                lens: dict, records: list[dict], stamp: str) -> dict:
    max_act = max((r["maxValue"] for r in records), default=0.0)
    heights, centres = [], []
    if int(stats.nonzero[p]) > 0:
        lo, hi = stats.bin_edges(p)
        heights = stats.hist[p].tolist()
        centres = round_sig(lo + (np.arange(db.N_BINS) + 0.5) * (hi - lo) / db.N_BINS)
    d = direction.double()
    n_align = min(ALIGNMENT_ROWS, len(d))
    align = d.topk(n_align)
    l1 = float(d.abs().sum())
    return {
        "modelId": x.model_id, "layer": x.source_id, "index": str(i), "sourceSetName": plan.set_name,
        "creatorId": plan.config.creator_id, "createdAt": stamp, "maxActApprox": max_act,
        "hasVector": plan.config.vectors, "vector": round_sig(d) if plan.config.vectors else [],
        "vectorLabel": None, "vectorDefaultSteerStrength": max_act, "hookName": x.hook_name,
        "topkCosSimIndices": [], "topkCosSimValues": [],
        "neuron_alignment_indices": align.indices.tolist(), "neuron_alignment_values": round_sig(align.values),
        "neuron_alignment_l1": round_sig(align.values.abs() / l1) if l1 > 0 else [0.0] * n_align,
        "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
        "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
        **lens,
        "frac_nonzero": round_sig([int(stats.nonzero[p]) / stats.n_tokens])[0],
        "freq_hist_data_bar_heights": heights, "freq_hist_data_bar_values": centres,
        "decoder_weights_dist": [],
    }
