"""The Neuronpedia v1 export layout: what its importer reads, how we write it, and a checker.

    DIR/v1/{modelId}/{sourceId}/
        release.jsonl  model.jsonl  sourceset.jsonl  source.jsonl     one JSON object each, plain
        features/batch-N.jsonl.gz       one Neuron row per line (gzip level 5)
        activations/batch-N.jsonl.gz    one Activation row per line

Importer rules (Neuronpedia's admin importer and its Prisma schema, as restated in
/work/shared/reference/neuronpedia/README.md): metadata lines go as-is to a Prisma
create, so every key is a scalar column of the table and every NOT NULL column
without a default is there; the model row is created before its source set and
source, so it names no default source set or source; for data files only the
keys of the first line are read, so every line has the same keys and holds the
NOT NULL columns; JSON has no NaN/Infinity; integer columns need JSON integers;
activations must point at an existing feature; ids that exist already are
skipped without a word; a folder is listed with one call that returns at most
MAX_FILES keys. `check_export` tests all of these offline. Temp files are
written under DIR/TEMP_DIR, never inside v1/.
"""

import gzip
import hashlib
import json
import math
import os
import re
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from xcli.errors import BadInput
from xcli.files import atomic_path, remove

GZIP_LEVEL = 5
DEFAULT_CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the seeded default user of a Neuronpedia instance
# Activations are shown only when their creatorId is one of these (PUBLIC_ACTIVATIONS_USER_IDS defaults).
PUBLIC_ACTIVATION_CREATORS = ("cljj57d3c000076ei38vwnv35", "clkht01d40000jv08hvalcvly")
VISIBILITY = ("PUBLIC", "UNLISTED", "PRIVATE")
MAX_TOKENS = 1024  # per activation record (upload API limit)
MAX_FILES = 1000  # the importer lists a folder with one S3 call, which returns at most 1000 keys
METADATA_FILES = ("release", "model", "sourceset", "source")
DATA_FOLDERS = ("features", "activations", "explanations")
BATCH_NAME = re.compile(r"^batch-(\d+)\.jsonl\.gz$")
TEMP_NAME = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]{8}$")  # xcli.files.temp_path_for: what an older xc left in v1/
TEMP_DIR = ".xc-tmp"  # DIR/.xc-tmp, beside v1/: where batch and metadata files are written before the rename
INT4 = (-(1 << 31), (1 << 31) - 1)  # Prisma Int is PostgreSQL integer
SOURCE_ID = re.compile(r"^(\d+|e)-[A-Za-z0-9_-]+?(__.+)?$")
MODEL_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
SET_NAME = re.compile(r"^[a-z0-9]([a-z0-9_-]*[a-z0-9])?$")
CUID = re.compile(r"^c[^\s-]{8,}$", re.I)

# Column types: str, int, float, bool, datetime; a trailing ? allows null; [..] is a list.
METADATA_COLUMNS = {
    "release": {"name": "str", "description": "str", "descriptionShort": "str?", "urls": "[str]",
                "creatorName": "str", "creatorNameShort": "str?", "creatorEmail": "str?", "creatorId": "str",
                "visibility": "visibility", "isNewUi": "bool", "featured": "bool", "defaultSourceSetName": "str?",
                "defaultSourceId": "str?", "defaultUmapSourceIds": "[str]", "createdAt": "datetime"},
    "model": {"id": "str", "displayName": "str", "displayNameShort": "str", "creatorId": "str", "instruct": "bool",
              "tlensId": "str?", "openRouterId": "str?", "dimension": "int?", "thinking": "bool",
              "visibility": "visibility", "defaultSourceSetName": "str?", "defaultSourceId": "str?",
              "defaultGraphSourceSetName": "str?", "inferenceEnabled": "bool", "layers": "int",
              "neuronsPerLayer": "int", "owner": "str", "website": "str?", "createdAt": "datetime",
              "updatedAt": "datetime"},
    "sourceset": {"modelId": "str", "name": "str", "description": "str", "type": "str", "creatorName": "str",
                  "creatorEmail": "str?", "creatorId": "str", "urls": "[str]", "releaseName": "str?",
                  "visibility": "visibility", "hasDashboards": "bool", "allowInferenceSearch": "bool",
                  "hasGraphs": "bool", "graphEnabled": "bool", "similarityMatrixEnabled": "bool",
                  "defaultOfModelId": "str?", "defaultGraphModelId": "str?", "defaultRange": "int",
                  "defaultShowBreaks": "bool", "showDfa": "bool", "showCorrelated": "bool",
                  "showHeadAttribution": "bool", "showUmap": "bool", "createdAt": "datetime"},
    "source": {"id": "str", "modelId": "str", "setName": "str", "creatorId": "str", "visibility": "visibility",
               "hasDashboards": "bool", "inferenceEnabled": "bool", "saelensConfig": "any?", "saelensRelease": "str?",
               "saelensSaeId": "str?", "hfRepoId": "str?", "hfFolderId": "str?", "defaultOfModelId": "str?",
               "hasUmap": "bool", "hasUmapLogSparsity": "bool", "hasUmapClusters": "bool", "num_prompts": "int?",
               "num_tokens_in_prompt": "int?", "dataset": "str?", "notes": "str?", "cosSimMatchModelId": "str?",
               "cosSimMatchSourceId": "str?", "createdAt": "datetime"},
}
NEURON_COLUMNS = {
    "modelId": "str", "layer": "str", "index": "str", "sourceSetName": "str?", "creatorId": "str?",
    "createdAt": "datetime", "maxActApprox": "float?", "hasVector": "bool", "vector": "[float]",
    "vectorLabel": "str?", "vectorDefaultSteerStrength": "float?", "hookName": "str?",
    "topkCosSimIndices": "[int]", "topkCosSimValues": "[float]",
    "neuron_alignment_indices": "[int]", "neuron_alignment_values": "[float]", "neuron_alignment_l1": "[float]",
    "correlated_neurons_indices": "[int]", "correlated_neurons_pearson": "[float]",
    "correlated_neurons_l1": "[float]", "correlated_features_indices": "[int]",
    "correlated_features_pearson": "[float]", "correlated_features_l1": "[float]",
    "neg_str": "[str]", "neg_values": "[float]", "pos_str": "[str]", "pos_values": "[float]",
    "frac_nonzero": "float", "freq_hist_data_bar_heights": "[float]", "freq_hist_data_bar_values": "[float]",
    "logits_hist_data_bar_heights": "[float]", "logits_hist_data_bar_values": "[float]",
    "decoder_weights_dist": "[float]", "umap_cluster": "int?", "umap_log_feature_sparsity": "float?",
    "umap_x": "float?", "umap_y": "float?",
}
ACTIVATION_COLUMNS = {
    "id": "str", "modelId": "str", "layer": "str", "index": "str", "tokens": "[str]", "values": "[float]",
    "maxValue": "float", "maxValueTokenIndex": "int", "minValue": "float", "creatorId": "str",
    "dataIndex": "str?", "dataSource": "str?", "dfaValues": "[float]", "dfaTargetIndex": "int?",
    "dfaMaxValue": "float?", "zQIndices": "[int]", "zKIndices": "[int]", "zValues": "[float]", "lossValues": "[float]",
    "logitContributions": "str?", "binMin": "float?", "binMax": "float?", "binContains": "float?",
    "qualifyingTokenIndex": "int?", "createdAt": "datetime",
}
EXPLANATION_COLUMNS = {
    "id": "str", "modelId": "str", "layer": "str", "index": "str", "description": "str", "authorId": "str",
    "typeName": "str?", "explanationModelName": "str?", "embedding": "[float]?", "notes": "str?",
    "triggeredByUserId": "str?", "scoreV1": "float", "scoreV2": "float?", "umap_x": "float?", "umap_y": "float?",
    "umap_cluster": "int?", "umap_log_feature_sparsity": "float?", "createdAt": "datetime", "updatedAt": "datetime",
}
# The NOT NULL columns without a database default, per file (the README's list, read from schema.prisma;
# tests/export/test_export.py compares it with the schema). Activation.id and Explanation.id have Prisma's
# client-side cuid() default, which the importer's SQL insert never runs: they must be supplied.
NOT_NULL = {
    "release": ("name", "description", "creatorName", "creatorId"),
    "model": ("id", "creatorId", "layers", "neuronsPerLayer", "owner"),
    "sourceset": ("modelId", "name", "description", "creatorName", "creatorId"),
    "source": ("id", "modelId", "setName", "creatorId"),
    "features": ("modelId", "layer", "index"),
    "activations": ("id", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue", "creatorId"),
    "explanations": ("id", "modelId", "layer", "index", "description", "authorId"),
}
METADATA_REQUIRED = {name: NOT_NULL[name] for name in METADATA_FILES}
# Nullable in the database, but a dashboard without them shows nothing (and the checks below need them).
ALSO_NEEDED = {"activations": ("tokens", "values")}
DATA_TABLES = {"features": (NEURON_COLUMNS, NOT_NULL["features"]),
               "activations": (ACTIVATION_COLUMNS, NOT_NULL["activations"]),
               "explanations": (EXPLANATION_COLUMNS, NOT_NULL["explanations"])}


# -- writing -----------------------------------------------------------------------

def created_at() -> str:
    """Now, or SOURCE_DATE_EPOCH when set (reproducible builds), in Neuronpedia's ISO format."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        moment = datetime.now(timezone.utc)
    else:
        try:
            moment = datetime.fromtimestamp(int(epoch), tz=timezone.utc)
        except ValueError:
            raise BadInput(f"SOURCE_DATE_EPOCH {epoch!r} is not a number of seconds since 1970") from None
    return moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def activation_id(crosscoder: str, model_id: str, source_id: str, index: int, group: str, rank: int) -> str:
    """A cuid-shaped id, the same on every export of this crosscoder and different for any other one.

    `crosscoder` is the checkpoint's identity (xcli.export.common.crosscoder_id): the importer skips an id
    that exists, so ids that depended only on (model, source, feature, group, rank) would let a second
    crosscoder exported under the same set name lose its activations to the first one's.
    """
    digest = hashlib.sha1(f"{crosscoder}/{model_id}/{source_id}/{index}/{group}/{rank}".encode()).hexdigest()
    return "c" + digest[:24]


def features_per_file(requested: int, n_features: int) -> int:
    """`requested` features per batch file, raised so that features/ and activations/ hold at most MAX_FILES."""
    return max(requested, -(-n_features // MAX_FILES))


@contextmanager
def _temp_beside(path: Path, tmp_dir: Path | None):
    """atomic_path, with the temp file in tmp_dir (same file system, outside the uploaded tree) when given."""
    if tmp_dir is None:
        with atomic_path(path, overwrite=True) as tmp:
            yield tmp
        return
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir / f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_jsonl_gz(path: Path, rows: list[dict], tmp_dir: Path | None = None) -> None:
    """Gzip level 5, no timestamp or name in the header: the same rows give the same bytes."""
    with _temp_beside(path, tmp_dir) as tmp:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                   compresslevel=GZIP_LEVEL, mtime=0) as gz:
            for row in rows:
                gz.write((json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n").encode())


def write_jsonl(path: Path, rows: list[dict], tmp_dir: Path | None = None) -> None:
    with _temp_beside(path, tmp_dir) as tmp:
        text = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in rows)
        tmp.write_text(text, encoding="utf-8")


def remove_temp_files(root: Path) -> None:
    """Delete what an interrupted run left: DIR/.xc-tmp, and temp files an older xc wrote inside v1/."""
    root = Path(root)
    remove(root / TEMP_DIR)
    if (root / "v1").is_dir():
        for path in (root / "v1").rglob(".*"):
            if path.is_file() and TEMP_NAME.match(path.name):
                path.unlink()


# -- checking ----------------------------------------------------------------------

class ExportProblems(BadInput):
    """An export that breaks the documented rules; `problems` lists them, first problem first."""

    def __init__(self, path, problems: list[str]):
        self.problems = problems
        super().__init__(f"{str(path)!r} fails {len(problems)} export check(s); first: {problems[0]}")


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range of a double (PostgreSQL rejects it)")
    return value


def _type_ok(kind: str, value) -> bool:
    if kind == "any":
        return True
    if kind.endswith("?"):
        return value is None or _type_ok(kind[:-1], value)
    if kind.startswith("["):
        return isinstance(value, list) and all(_type_ok(kind[1:-1], v) for v in value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool) and INT4[0] <= value <= INT4[1]
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "visibility":
        return value in VISIBILITY
    if kind == "datetime":
        return isinstance(value, str) and _is_datetime(value)
    raise ValueError(kind)


def _is_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


def _describe(kind: str) -> str:
    names = {"int": "an integer of 32 bits", "float": "a number", "str": "a string", "bool": "true or false",
             "visibility": "one of " + "/".join(VISIBILITY), "datetime": "an ISO datetime"}
    if kind.endswith("?"):
        return _describe(kind[:-1]) + " or null"
    if kind.startswith("["):
        plural = {"int": "integers of 32 bits", "float": "numbers", "str": "strings", "bool": "booleans"}
        return "a list of " + plural.get(kind[1:-1], kind[1:-1])
    return names.get(kind, kind)


class Checker:
    """Collects problems while walking an export; stops listing after `limit`."""

    def __init__(self, root: Path, limit: int = 50):
        self.root, self.limit, self.problems, self.warnings = root, limit, [], []
        self.metadata: list[tuple[Path, dict]] = []  # (source folder, its metadata rows that passed)
        self.ids: set[str] = set()  # Activation ids of the whole export: the id is the table's primary key
        self.count = 0  # problems found, listed or not

    def problem(self, where, message: str) -> None:
        self.count += 1
        if len(self.problems) < self.limit:
            rel = os.path.relpath(where, self.root) if isinstance(where, Path) else where
            self.problems.append(f"{rel}: {message}")

    def read_lines(self, path: Path, gz: bool):
        """Parsed JSON objects of a file, reporting the first bad line; None if unreadable."""
        try:
            if gz:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    text = f.read()
            else:
                text = path.read_text(encoding="utf-8")
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
            self.problem(path, f"cannot be read as {'gzip ' if gz else ''}UTF-8 text ({type(e).__name__}: {e})")
            return None
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                self.problem(path, f"line {n} is empty")
                return None
            try:
                row = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
            except ValueError as e:
                self.problem(path, f"line {n} is not valid JSON ({e})")
                return None
            if not isinstance(row, dict):
                self.problem(path, f"line {n} is not a JSON object")
                return None
            rows.append(row)
        return rows

    def check_columns(self, path: Path, rows: list[dict], columns: dict, required, strict_keys: bool,
                      needed=()) -> bool:
        """Keys and types of every row. `required`: NOT NULL columns; `needed`: what a dashboard needs."""
        if not rows:
            self.problem(path, "holds no rows")
            return False
        first = list(rows[0])
        ok = True
        for n, row in enumerate(rows, 1):
            if list(row) != first and set(row) != set(first):
                missing = sorted(set(first) - set(row)) or sorted(set(row) - set(first))
                self.problem(path, f"line {n} has other keys than line 1 ({', '.join(missing)}); "
                                   f"the importer reads only the keys of line 1")
                return False
        unknown = [k for k in first if k not in columns]
        if unknown:
            self.problem(path, f"unknown column(s) {', '.join(unknown)}"
                               + (" (the importer's Prisma create would fail)" if strict_keys
                                  else " (the importer would drop them)"))
            ok = False
        missing = [k for k in required if k not in first]
        if missing:
            self.problem(path, f"required column(s) {', '.join(missing)} missing: NOT NULL without a default in "
                               f"Neuronpedia's database, so the import fails")
            ok = False
        missing = [k for k in needed if k not in first]
        if missing:
            self.problem(path, f"column(s) {', '.join(missing)} missing: the dashboard would show nothing")
            ok = False
        for n, row in enumerate(rows, 1):
            for key, value in row.items():
                kind = columns.get(key)
                if kind and not _type_ok(kind, value):
                    self.problem(path, f"line {n}: {key} must be {_describe(kind)}, not {json.dumps(value)[:60]}")
                    return False
        return ok


def check_export(path) -> dict:
    """Validate a Neuronpedia v1 export folder; return a summary or raise ExportProblems."""
    root = Path(path)
    if not root.is_dir():
        raise BadInput(f"{str(root)!r} is not a folder; --check takes the DIR an export wrote")
    base = root / "v1" if (root / "v1").is_dir() else root
    c = Checker(root)
    manifest = _read_manifest(root, c)
    if manifest is not None and manifest.get("kind") == "saelens":
        raise BadInput(f"{str(root)!r} holds SAELens SAEs (xc export --format saelens); --check validates "
                       f"Neuronpedia exports")
    if manifest is not None and not manifest.get("complete", False):
        c.problem(root / "xc-export.json", "the export is incomplete; finish it with `xc export ... --resume`")
    summary = {"path": str(root), "sources": [], "features": 0, "activations": 0}
    source_dirs = sorted(p for model in base.iterdir() if model.is_dir() and model.name != "config"
                         for p in model.iterdir() if p.is_dir())
    if not source_dirs:
        c.problem(base, "holds no {modelId}/{sourceId}/ folders")
    for source_dir in source_dirs:
        summary["sources"].append(_check_source(source_dir, c, manifest))
    _check_shared_rows(c)
    _check_layout(base, base != root, c)
    if manifest is not None:
        expected = {(s["modelId"], s["sourceId"]) for s in manifest.get("sources", [])}
        found = {(s["modelId"], s["sourceId"]) for s in summary["sources"]}
        for model_id, source_id in sorted(expected - found):
            c.problem(root, f"source {model_id}/{source_id} named in xc-export.json is missing")
    if c.problems:
        raise ExportProblems(root, c.problems)
    summary["features"] = sum(s["features"] for s in summary["sources"])
    summary["activations"] = sum(s["activations"] for s in summary["sources"])
    summary["warnings"] = c.warnings
    return summary


def _read_manifest(root: Path, c: Checker) -> dict | None:
    path = root / "xc-export.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        c.problem(path, f"is not valid JSON ({e})")
        return None


SHARED_ROWS = {"release": lambda r: r["name"], "model": lambda r: r["id"],
               "sourceset": lambda r: (r["modelId"], r["name"])}


def _check_shared_rows(c: Checker) -> None:
    """The importer creates a release, model or source set once, from the first folder it reads: every
    folder that holds the same row must hold it identically, or what the others say is lost."""
    first = {}
    for source_dir, meta in c.metadata:
        for name, key in SHARED_ROWS.items():
            if name not in meta:
                continue
            row, seen = meta[name], first.setdefault((name, key(meta[name])), (source_dir, meta[name]))
            if seen[1] != row:
                differ = sorted(k for k in set(row) | set(seen[1]) if row.get(k, ...) != seen[1].get(k, ...))
                c.problem(source_dir / f"{name}.jsonl",
                          f"differs from {os.path.relpath(seen[0] / f'{name}.jsonl', c.root)} in "
                          f"{', '.join(differ)}; the importer creates this {name} row once, from whichever folder "
                          f"comes first, so it must be the same in every folder")


def _check_layout(base: Path, is_v1: bool, c: Checker) -> None:
    """Every file under v1/ is a metadata file or a batch file: the importer reads whatever it lists."""
    for path in sorted(base.rglob("*")):
        parts = path.relative_to(base).parts
        if path.is_dir() or parts[0] == "config" or (len(parts) == 1 and not is_v1):
            continue
        if len(parts) == 3 and parts[2] in {f"{m}.jsonl" for m in METADATA_FILES}:
            continue
        if len(parts) == 4 and parts[2] in DATA_FOLDERS and BATCH_NAME.match(parts[3]):
            continue
        if TEMP_NAME.match(path.name) or ".tmp" in path.name:
            c.problem(path, "is a temp file left by an interrupted write, inside the uploaded tree; delete it "
                            "(xc export ... --resume does)")
        elif len(parts) == 4 and parts[2] in DATA_FOLDERS:
            c.problem(path, "is not named batch-N.jsonl.gz; the importer would skip it")
        else:
            c.problem(path, "is not part of the v1 layout ({modelId}/{sourceId}/ metadata .jsonl files and "
                            f"{'/, '.join(DATA_FOLDERS)}/batch-N.jsonl.gz)")


def local_path(text: str) -> bool:
    """Whether a string names a file on this machine (absolute or home-relative) rather than a dataset."""
    return text.startswith(("/", "~", "\\", "file:")) or bool(re.match(r"^[A-Za-z]:[\\/]", text))


def _check_source(source_dir: Path, c: Checker, manifest: dict | None) -> dict:
    model_id, source_id = source_dir.parent.name, source_dir.name
    meta = {}
    for name in METADATA_FILES:
        path = source_dir / f"{name}.jsonl"
        if not path.exists():
            if name != "release":  # the importer tolerates a missing release.jsonl
                c.problem(path, "is missing")
            continue
        rows = c.read_lines(path, gz=False)
        if rows is None:
            continue
        if len(rows) != 1:
            c.problem(path, f"must hold exactly one line, not {len(rows)}")
            continue
        if c.check_columns(path, rows, METADATA_COLUMNS[name], METADATA_REQUIRED[name], strict_keys=True):
            meta[name] = rows[0]
    c.metadata.append((source_dir, meta))
    if not SOURCE_ID.match(source_id):
        c.problem(source_dir, "the folder name is not a source id like 6-myset or 6-myset__suffix")
    set_name = source_id.split("-", 1)[-1].split("__")[0]
    if "source" in meta:
        s = meta["source"]
        if s["id"] != source_id or s["modelId"] != model_id:
            c.problem(source_dir / "source.jsonl", f"id/modelId {s['id']}/{s['modelId']} differ from the folder "
                                                   f"{model_id}/{source_id}")
        if s["setName"] != set_name:
            c.problem(source_dir / "source.jsonl", f"setName {s['setName']!r} differs from the set in the source "
                                                   f"id ({set_name!r})")
    if "model" in meta and meta["model"]["id"] != model_id:
        c.problem(source_dir / "model.jsonl", f"id {meta['model']['id']!r} differs from the folder {model_id!r}")
    named = [k for k in ("defaultSourceSetName", "defaultSourceId", "defaultGraphSourceSetName")
             if meta.get("model", {}).get(k) is not None]
    if named:
        c.problem(source_dir / "model.jsonl", f"{', '.join(named)} must be null: the importer creates the model "
                                              f"before its source set and source, so on a fresh instance the "
                                              f"foreign key fails")
    dataset = meta.get("source", {}).get("dataset")
    if isinstance(dataset, str) and local_path(dataset):
        c.problem(source_dir / "source.jsonl", f"dataset {dataset!r} publishes a local path; give the corpus a "
                                               f"name (e.g. its file name)")
    if "sourceset" in meta:
        ss = meta["sourceset"]
        if ss["modelId"] != model_id or ss["name"] != set_name:
            c.problem(source_dir / "sourceset.jsonl", f"modelId/name {ss['modelId']}/{ss['name']} differ from "
                                                      f"{model_id}/{set_name}")
    if "release" in meta and "sourceset" in meta:
        release = meta["sourceset"].get("releaseName")
        if release is not None and release != meta["release"]["name"]:
            c.problem(source_dir / "sourceset.jsonl", f"releaseName {release!r} is not the release "
                                                      f"{meta['release']['name']!r}")
    release = meta.get("sourceset", {}).get("releaseName")
    if release is not None and not (source_dir / "release.jsonl").exists():
        c.warnings.append(f"{os.path.relpath(source_dir, c.root)}: sourceset.jsonl names release {release!r} but "
                          f"there is no release.jsonl; the import fails unless the instance has that release")
    dimension = meta.get("model", {}).get("dimension")

    batches = {}
    for table in DATA_FOLDERS:
        folder = source_dir / table
        batches[table] = {}
        if not folder.exists():
            if table == "features":
                c.problem(folder, "is missing")
            continue
        names = sorted(p.name for p in folder.iterdir())
        if len(names) > MAX_FILES:
            c.problem(folder, f"holds {len(names)} files; the importer lists at most {MAX_FILES} keys per folder "
                              f"and skips the rest (write more features per batch file)")
        for name in names:
            match = BATCH_NAME.match(name)
            if match:  # anything else is reported by _check_layout
                batches[table][int(match.group(1))] = folder / name

    features: dict[str, int] = {}  # index -> batch
    n_activations, unread = 0, set()  # unread: feature batches whose rows could not be checked
    for n, path in sorted(batches["features"].items()):
        rows = c.read_lines(path, gz=True)
        if rows is None or not c.check_columns(path, rows, NEURON_COLUMNS, DATA_TABLES["features"][1], False):
            unread.add(n)
            continue
        for line, row in enumerate(rows, 1):
            _check_neuron(path, line, row, model_id, source_id, set_name, dimension, features, n, c)
    for n, path in sorted(batches["activations"].items()):
        if n not in batches["features"]:
            c.problem(path, f"has no features/batch-{n}.jsonl.gz beside it")
        rows = c.read_lines(path, gz=True)
        if rows is None or not c.check_columns(path, rows, ACTIVATION_COLUMNS, DATA_TABLES["activations"][1], False,
                                               ALSO_NEEDED["activations"]):
            continue
        n_activations += len(rows)
        if n in unread or n not in batches["features"]:
            continue  # its features are already reported
        for line, row in enumerate(rows, 1):
            if not _check_activation(path, line, row, model_id, source_id, features, n, c.ids, c):
                break  # one problem per file: the rest of it is most likely the same
    for n, path in sorted(batches["explanations"].items()):
        rows = c.read_lines(path, gz=True)
        if rows is None or not c.check_columns(path, rows, EXPLANATION_COLUMNS, DATA_TABLES["explanations"][1],
                                               False):
            continue
        for line, row in enumerate(rows, 1):
            if (row["modelId"], row["layer"]) != (model_id, source_id) or str(row["index"]) not in features:
                c.problem(path, f"line {line}: explains feature {row['index']} that is not in features/")
                break
    if manifest is not None:
        expected = next((s.get("batches") for s in manifest.get("sources", [])
                         if (s.get("modelId"), s.get("sourceId")) == (model_id, source_id)), None)
        if expected is not None:
            missing = sorted(set(range(expected)) - set(batches["features"]))
            if missing:
                c.problem(source_dir / "features", f"batch-{missing[0]}.jsonl.gz is missing "
                                                   f"({len(missing)} of {expected} batches)")
    return {"modelId": model_id, "sourceId": source_id, "batches": len(batches["features"]),
            "features": len(features), "activations": n_activations}


def _check_neuron(path, line, row, model_id, source_id, set_name, dimension, seen: dict, batch: int,
                  c: Checker) -> None:
    where = f"line {line}"
    if (row["modelId"], row["layer"]) != (model_id, source_id):
        c.problem(path, f"{where}: modelId/layer {row['modelId']}/{row['layer']} differ from the folder "
                        f"{model_id}/{source_id}")
        return
    index = row["index"]
    if not (isinstance(index, str) and index.isdigit()):
        c.problem(path, f"{where}: index must be a decimal string, not {json.dumps(index)}")
        return
    if index in seen:
        c.problem(path, f"{where}: feature {index} appears twice (also in batch {seen[index]})")
    seen[index] = batch
    if row.get("sourceSetName") not in (None, set_name):
        c.problem(path, f"{where}: sourceSetName {row['sourceSetName']!r} is not the set {set_name!r} of the source "
                        f"id; the foreign key to SourceSet fails")
    density = row.get("frac_nonzero")
    if density is not None and not 0 <= density <= 1:
        c.problem(path, f"{where}: frac_nonzero {density} is outside [0, 1]")
    for a, b in (("pos_str", "pos_values"), ("neg_str", "neg_values"),
                 ("freq_hist_data_bar_heights", "freq_hist_data_bar_values"),
                 ("logits_hist_data_bar_heights", "logits_hist_data_bar_values"),
                 ("neuron_alignment_indices", "neuron_alignment_values")):
        if a in row and b in row and len(row[a]) != len(row[b]):
            c.problem(path, f"{where}: {a} and {b} have different lengths ({len(row[a])}, {len(row[b])})")
    for key in ("pos_str", "neg_str"):
        if len(row.get(key, [])) > 20:
            c.problem(path, f"{where}: {key} has {len(row[key])} entries; at most 20 are accepted")
    if row.get("hasVector") and dimension is not None and len(row.get("vector", [])) != dimension:
        c.problem(path, f"{where}: vector has {len(row.get('vector', []))} entries, not the model dimension "
                        f"{dimension}")
    if row.get("hasVector") is False and row.get("vector"):
        c.problem(path, f"{where}: hasVector is false but vector is not empty")


def _check_activation(path, line, row, model_id, source_id, features: dict, batch: int, ids: set,
                      c: Checker) -> bool:
    """Checks one Activation row; False when it has a problem."""
    where, before = f"line {line}", c.count
    if (row["modelId"], row["layer"]) != (model_id, source_id):
        c.problem(path, f"{where}: modelId/layer {row['modelId']}/{row['layer']} differ from the folder")
        return False
    index = str(row["index"])
    if index not in features:
        c.problem(path, f"{where}: activation of feature {index}, which is not in features/")
        return False
    if features[index] != batch:
        c.problem(path, f"{where}: feature {index} is in features/batch-{features[index]}, not batch-{batch}")
    if not CUID.match(row["id"]):
        c.problem(path, f"{where}: id {row['id']!r} is not cuid-shaped (c followed by 8+ characters)")
    if row["id"] in ids:
        c.problem(path, f"{where}: id {row['id']} is used twice")
    ids.add(row["id"])
    tokens, values = row["tokens"], row["values"]
    if len(tokens) != len(values):
        c.problem(path, f"{where}: {len(tokens)} tokens but {len(values)} values")
        return False
    if not 1 <= len(tokens) <= MAX_TOKENS:
        c.problem(path, f"{where}: {len(tokens)} tokens; 1 to {MAX_TOKENS} are accepted")
        return False
    top = max(values)
    for key, expected in (("maxValue", top), ("minValue", min(values)), ("maxValueTokenIndex", values.index(top))):
        if key in row and not math.isclose(row[key], expected, rel_tol=1e-9, abs_tol=1e-12):
            c.problem(path, f"{where}: {key} is {row[key]} but the values give {expected}")
    if "qualifyingTokenIndex" in row and row["qualifyingTokenIndex"] is not None \
            and not 0 <= row["qualifyingTokenIndex"] < len(tokens):
        c.problem(path, f"{where}: qualifyingTokenIndex {row['qualifyingTokenIndex']} is outside the tokens")
    if row.get("binMin") == -1:
        if row.get("binContains") != -1:
            c.problem(path, f"{where}: a top-activations record (binMin -1) needs binContains -1")
    elif row.get("binContains") is not None and not 0 <= row["binContains"] <= 1:
        c.problem(path, f"{where}: binContains {row['binContains']} is outside [0, 1]")
    if row["creatorId"] not in PUBLIC_ACTIVATION_CREATORS and len(c.warnings) < 10:
        warning = (f"{path.parent.parent.name}: activations by creatorId {row['creatorId']} are shown only if "
                   f"PUBLIC_ACTIVATIONS_USER_IDS lists it")
        if warning not in c.warnings:
            c.warnings.append(warning)
    return c.count == before
