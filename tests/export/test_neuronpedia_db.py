"""xc export into Neuronpedia's real schema: its tables in a real PostgreSQL, loaded by its importer's rules.

The yardstick for "an export Neuronpedia accepts": tests/neuronpedia_db.py builds the tables from
Neuronpedia's own schema.prisma and imports a `v1/` folder as its admin importer does (create-if-absent
metadata rows, then jsonb_to_recordset with ON CONFLICT DO NOTHING). Every row of the export must land,
two crosscoders of the same width must not collide, and a re-import must change nothing.
Skips where PostgreSQL is not installed (.ci/run installs it) or the schema file is not found.
"""

import dataclasses
import gzip
import itertools
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import neuronpedia_db as npdb
from test_export import N_LATENTS, sources_for, sparse_crosscoder, write_store
from xcli.cli import cli
from xcli.crosscoder import model as cc
from xcli.data.store import open_store
from xcli.export.config import ExportConfig

EXPORT_ARGS = ["--top-k", "3", "--batch-size", "7", "--window", "8"]
CREATOR_ID = next(f.default for f in dataclasses.fields(ExportConfig) if f.name == "creator_id")
# What the README beside schema.prisma lists as required (NOT NULL, no database default) per table.
REQUIRED = {
    "Model": {"id", "creatorId", "layers", "neuronsPerLayer", "owner"},
    "SourceRelease": {"name", "description", "creatorName", "creatorId"},
    "SourceSet": {"modelId", "name", "description", "creatorName", "creatorId"},
    "Source": {"id", "modelId", "setName", "creatorId"},
    "Neuron": {"modelId", "layer", "index"},
    "Activation": {"id", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue", "creatorId"},
}
TABLES = ("SourceRelease", "Model", "SourceSet", "Source", "Neuron", "Activation")


# -- the database -------------------------------------------------------------------

@pytest.fixture(scope="session")
def schema() -> npdb.Schema:
    path = npdb.find_schema()
    if path is None:
        pytest.skip("Neuronpedia's schema.prisma not found: set XC_NEURONPEDIA_SCHEMA to its path")
    return npdb.load_schema(path)


@pytest.fixture(scope="session")
def pg():
    if npdb.find_bin_dir() is None:
        pytest.skip(npdb.NOT_INSTALLED)
    server = npdb.PostgresServer.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def template(pg, schema) -> str:
    """A database holding Neuronpedia's empty tables, cloned for each test."""
    db = pg.create_database("neuronpedia")
    db.sql(schema.ddl(pg.available_extensions()))
    return db.name


_numbers = itertools.count()


@pytest.fixture
def db(pg, template):
    """A fresh Neuronpedia database with the user xc writes as creatorId."""
    db = pg.create_database(f"test_{next(_numbers)}", template=template)
    db.create_user(CREATOR_ID, "xc-creator")
    yield db
    pg.drop_database(db.name)


# -- exports of two tiny crosscoders ----------------------------------------------------

def xc_export(checkpoint: Path, store: Path, out: Path, epoch: str) -> Path:
    result = CliRunner().invoke(cli, ["export", str(checkpoint), "--store", str(store), "-o", str(out), *EXPORT_ARGS],
                                env={"SOURCE_DATE_EPOCH": epoch})
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory) -> dict[str, Path]:
    """Crosscoders a and b (other weights, same width, same models) exported; a exported again a day later."""
    root = tmp_path_factory.mktemp("np_db")
    store_path = write_store(root / "acts.zarr", tiny, documents=8)
    store = open_store(store_path)
    checkpoints = {name: cc.save(sparse_crosscoder(sources_for(tiny), store, seed=seed), root / f"{name}.safetensors")
                   for name, seed in (("a", 0), ("b", 1))}
    return {"a": xc_export(checkpoints["a"], store_path, root / "np-a", "1767225600"),
            "b": xc_export(checkpoints["b"], store_path, root / "np-b", "1767225600"),
            "a again": xc_export(checkpoints["a"], store_path, root / "np-a-again", "1767312000")}


def import_ok(db, folder: Path, schema) -> npdb.ImportResult:
    result = npdb.import_export(db, folder, schema)
    assert result.errors == [], f"the database refused rows of {folder.name}:\n" + "\n".join(result.errors)
    assert result.unlisted == [], "files past the importer's 1000-key listing"
    return result


# -- the schema --------------------------------------------------------------------

def test_schema_gives_the_tables_an_import_touches(schema):
    tables = schema.tables()
    assert len(tables) == len(schema.models) and "vector" in schema.extensions
    for name, required in REQUIRED.items():
        columns = tables[name].columns.values()
        assert {c.name for c in columns if c.not_null and c.default is None} == required, name
    activation, neuron, model = tables["Activation"], tables["Neuron"], tables["Model"]
    assert activation.primary_key == ["id"] and activation.columns["id"].client_default == "cuid"
    assert activation.columns["maxValueTokenIndex"].sql_type == "INTEGER"
    assert activation.columns["tokens"].sql_type == "TEXT[]" and not activation.columns["tokens"].not_null
    assert activation.columns["createdAt"].sql_type == "TIMESTAMP(3)"
    assert activation.columns["createdAt"].default == "CURRENT_TIMESTAMP"
    assert neuron.primary_key is None and neuron.uniques == [["modelId", "layer", "index"]]
    assert neuron.columns["vector"].default == "ARRAY[]::DOUBLE PRECISION[]"
    assert neuron.columns["maxActApprox"].default == "0" and not neuron.columns["maxActApprox"].not_null
    assert model.columns["visibility"].sql_type == '"Visibility"' and model.columns["visibility"].default == "'PRIVATE'"
    assert tables["User"].columns["emailUnsubscribeCode"].client_default == "cuid"
    assert tables["ProblemNode"].columns["id"].serial
    assert tables["NlaExplainCache"].columns["textHash"].sql_type == "VARCHAR(64)"
    assert tables["Source"].identity == ["modelId", "id"] and tables["SourceSet"].identity == ["modelId", "name"]

    def fks(table):
        return {(tuple(f.columns), f.target, tuple(f.target_columns)) for f in tables[table].foreign_keys}

    assert {(("defaultSourceSetName", "id"), "SourceSet", ("name", "modelId")),
            (("defaultSourceId", "id"), "Source", ("id", "modelId")),
            (("creatorId",), "User", ("id",))} <= fks("Model")
    assert fks("Neuron") == {(("modelId", "layer"), "Source", ("modelId", "id")),
                             (("modelId", "sourceSetName"), "SourceSet", ("modelId", "name")),
                             (("creatorId",), "User", ("id",)), (("modelId",), "Model", ("id",))}
    assert fks("Activation") == {(("modelId", "layer", "index"), "Neuron", ("modelId", "layer", "index")),
                                 (("creatorId",), "User", ("id",))}


def test_postgres_holds_the_tables_as_prisma_makes_them(db, schema):
    tables = {r[0] for r in db.sql("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public';")}
    assert tables == set(schema.tables())
    for name, required in REQUIRED.items():
        rows = db.sql(f"SELECT column_name FROM information_schema.columns WHERE table_name = '{name}' "
                      f"AND is_nullable = 'NO' AND column_default IS NULL;")
        assert {r[0] for r in rows} == required, name
    fks = db.sql("SELECT conname, condeferrable FROM pg_constraint WHERE contype = 'f' "
                 "AND conrelid = '\"Model\"'::regclass;")
    assert {("Model_defaultSourceSetName_id_fkey", "f"), ("Model_defaultSourceId_id_fkey", "f"),
            ("Model_creatorId_fkey", "f")} <= {tuple(r) for r in fks}


# -- the importer itself, on a hand-made export that follows Neuronpedia's own exporter ---------

def write_gz(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def hand_made(root: Path, files: int = 1) -> Path:
    """One model, one source, 2 features per batch file, one activation per feature (no model defaults)."""
    folder = root / "v1" / "m" / "0-s"
    folder.mkdir(parents=True)
    me = {"creatorId": CREATOR_ID}
    rows = {"release": {"name": "s", "description": "d", "creatorName": "x", **me},
            "model": {"id": "m", "displayName": "m", **me, "layers": 1, "neuronsPerLayer": 4, "owner": "x",
                      "visibility": "PUBLIC", "createdAt": "2026-01-01T00:00:00.000Z"},
            "sourceset": {"modelId": "m", "name": "s", "description": "d", "creatorName": "x", **me, "urls": [],
                          "releaseName": "s"},
            "source": {"id": "0-s", "modelId": "m", "setName": "s", **me, "num_prompts": 3}}
    for name, row in rows.items():
        (folder / f"{name}.jsonl").write_text(json.dumps(row) + "\n")
    for b in range(files):
        write_gz(folder / "features" / f"batch-{b}.jsonl.gz",
                 [{"modelId": "m", "layer": "0-s", "index": str(i), "sourceSetName": "s", **me, "maxActApprox": 1.5,
                   "pos_str": ["a"], "pos_values": [0.5], "freq_hist_data_bar_heights": [2, 1]}
                  for i in (2 * b, 2 * b + 1)])
        write_gz(folder / "activations" / f"batch-{b}.jsonl.gz",
                 [{"id": f"cact{i:021d}", "modelId": "m", "layer": "0-s", "index": str(i), "tokens": ["a", "b"],
                   "values": [0.0, 1.5], "maxValue": 1.5, "maxValueTokenIndex": 1, "minValue": 0.0, **me,
                   "binMin": -1, "binMax": 1.5, "binContains": -1, "qualifyingTokenIndex": 1}
                  for i in (2 * b, 2 * b + 1)])
    return root


def test_a_hand_made_export_lands_and_a_reimport_skips_it(db, schema, tmp_path):
    root = hand_made(tmp_path / "np", files=3)
    first = npdb.import_export(db, root, schema, limit=2)
    assert first.errors == [] and first.unlisted == ["v1/m/0-s/features/batch-2.jsonl.gz",
                                                     "v1/m/0-s/activations/batch-2.jsonl.gz"]
    assert dict(first.inserted) == {"SourceRelease": 1, "Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 4,
                                    "Activation": 4}
    assert db.sql('SELECT "maxValueTokenIndex", "values"[2], "visibility" FROM "Activation" a, "Model" m '
                  "WHERE a.index = '3';") == [["1", "1.5", "PUBLIC"]]
    again = npdb.import_export(db, root, schema)
    assert again.errors == [] and dict(again.inserted) == {"Neuron": 2, "Activation": 2}  # the unlisted batch
    assert dict(again.skipped) == {"SourceRelease": 1, "Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 4,
                                   "Activation": 4}
    assert db.counts(TABLES) == {"SourceRelease": 1, "Model": 1, "SourceSet": 1, "Source": 1, "Neuron": 6,
                                 "Activation": 6}


def edit_line(name: str, change):
    def edit(folder: Path):
        path = folder / name
        if name.endswith(".gz"):
            with gzip.open(path, "rt") as f:
                rows = [json.loads(line) for line in f]
            change(rows[0])
            write_gz(path, rows)
        else:
            row = json.loads(path.read_text())
            change(row)
            path.write_text(json.dumps(row) + "\n")
    return edit


BROKEN = {
    "model names its default source set": (edit_line("model.jsonl", lambda r: r.update(defaultSourceSetName="s")),
                                           'violates foreign key constraint "Model_defaultSourceSetName_id_fkey"'),
    "model names its default source": (edit_line("model.jsonl", lambda r: r.update(defaultSourceId="0-s")),
                                       'violates foreign key constraint "Model_defaultSourceId_id_fkey"'),
    "unknown metadata key": (edit_line("source.jsonl", lambda r: r.update(crosscoder=True)),
                             "Unknown argument(s) crosscoder"),
    "string for an Int column": (edit_line("model.jsonl", lambda r: r.update(layers="1")),
                                 "layers: '1' is not a valid Int"),
    "activation without id": (edit_line("activations/batch-0.jsonl.gz", lambda r: r.pop("id")),
                              'null value in column "id" of relation "Activation"'),
    "float token index": (edit_line("activations/batch-0.jsonl.gz", lambda r: r.update(maxValueTokenIndex=1.0)),
                          'invalid input syntax for type integer: "1.0"'),
    "activation of no feature": (edit_line("activations/batch-0.jsonl.gz", lambda r: r.update(index="99")),
                                 'violates foreign key constraint "Activation_modelId_layer_index_fkey"'),
    "unknown creator": (edit_line("features/batch-0.jsonl.gz", lambda r: r.update(creatorId="nobody")),
                        'violates foreign key constraint "Neuron_creatorId_fkey"'),
    "feature of no source": (edit_line("features/batch-0.jsonl.gz", lambda r: r.update(layer="1-s")),
                             'violates foreign key constraint "Neuron_modelId_layer_fkey"'),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_the_importer_refuses_what_neuronpedia_refuses(db, schema, tmp_path, name):
    edit, message = BROKEN[name]
    root = hand_made(tmp_path / "np")
    edit(root / "v1" / "m" / "0-s")
    result = npdb.import_export(db, root, schema)
    assert len(result.errors) == 1 and message in result.errors[0], result.errors


def test_keys_of_line_one_that_are_no_column_are_dropped(db, schema, tmp_path):
    root = hand_made(tmp_path / "np")
    edit_line("features/batch-0.jsonl.gz", lambda r: r.update(decoder_norm=3.0))(root / "v1" / "m" / "0-s")
    result = npdb.import_export(db, root, schema)
    assert result.errors == [] and result.inserted["Neuron"] == 2


# -- real exports ------------------------------------------------------------------------

def test_every_row_of_an_export_lands(db, schema, exports):
    lines = npdb.export_lines(exports["a"])
    assert lines["Neuron"] == 2 * N_LATENTS and lines["Activation"] > 0
    result = import_ok(db, exports["a"], schema)
    assert result.inserted["Neuron"] == lines["Neuron"] and result.inserted["Activation"] == lines["Activation"]
    assert {t: result.inserted[t] for t in ("Model", "SourceSet", "Source")} == {"Model": 2, "SourceSet": 2,
                                                                                 "Source": 2}
    assert db.counts(["Neuron", "Activation"]) == {"Neuron": lines["Neuron"], "Activation": lines["Activation"]}


def test_two_crosscoders_of_the_same_width_both_land(db, schema, exports):
    a, b = import_ok(db, exports["a"], schema), import_ok(db, exports["b"], schema)
    lines = npdb.export_lines(exports["a"]) + npdb.export_lines(exports["b"])
    assert b.skipped["Neuron"] == 0 and b.skipped["Activation"] == 0, "b's rows collided with a's and were dropped"
    assert b.inserted["Source"] == 2, "b's sources must be its own, not a's"
    assert db.counts(["Neuron", "Activation"]) == {"Neuron": lines["Neuron"], "Activation": lines["Activation"]}
    assert a.inserted["Neuron"] + b.inserted["Neuron"] == lines["Neuron"]


def test_reimporting_a_reexport_changes_nothing(db, schema, exports):
    import_ok(db, exports["a"], schema)
    before = db.counts(TABLES)
    again = import_ok(db, exports["a again"], schema)
    assert sum(again.inserted.values()) == 0, f"new rows on a re-import: {dict(again.inserted)}"
    assert db.counts(TABLES) == before
    lines = npdb.export_lines(exports["a"])
    assert before["Neuron"] == lines["Neuron"] and before["Activation"] == lines["Activation"]

