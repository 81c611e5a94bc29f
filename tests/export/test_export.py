"""xc export: dashboards against brute force, the Neuronpedia rules, resume, bad input (SAELens: test_saelens.py)."""

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import tiny_models
from xcli.cli import cli
from xcli.crosscoder import model as cc
from xcli.data.store import StoreWriter, open_store
from xcli.errors import BadInput
from xcli.export import ExportConfig, export
from xcli.export import dashboards as db
from xcli.export import neuronpedia as ex
from xcli.export import neuronpedia_schema as npd
from xcli.export.common import SIDECAR, crosscoder_id, default_set_name, plan_slices
from xcli.lm.models import read_unembedding
from xcli.source import Source

EPOCH = "1767225600"  # 2026-01-01: fixed createdAt, so that two runs can be compared byte for byte
ARGS = dict(top_k=5, batch_size=7, window=8)
N_LATENTS, DEAD = 24, 5


def sources_for(tiny):
    return [Source("a.resid_post.1", str(tiny["gpt2"]), "resid_post", 1, 32),
            Source("b.resid_post.1", str(tiny["gpt2_b"]), "resid_post", 1, 32)]


def write_store(path: Path, tiny, documents: int = 12) -> Path:
    """Layer-1 residual streams of the two tiny GPT-2s over short documents (BOS left out)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    sources = sources_for(tiny)
    models = [AutoModel.from_pretrained(tiny[n]).eval() for n in ("gpt2", "gpt2_b")]
    writer = StoreWriter(path, sources, {"tokenizer": str(tiny["tokenizer"]), "context_length": 64},
                         dtype="float32", chunk_rows=64)
    for seq, line in enumerate(tiny_models.corpus_lines(documents)):
        ids = tok(line)["input_ids"]
        with torch.no_grad():
            acts = {s.name: m(torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0, 1:].numpy()
                    for s, m in zip(sources, models)}
        writer.append(acts, tokens=ids[1:], sequence=[seq] * (len(ids) - 1), position=list(range(1, len(ids))))
    writer.close()
    return path


def sparse_crosscoder(sources, store, arch="relu", k=None, seed=0) -> cc.Crosscoder:
    """A random crosscoder made sparse on this store (about 15% density), latent DEAD never firing."""
    m = cc.Crosscoder(sources, N_LATENTS, arch, k)
    m.init_weights(torch.Generator().manual_seed(seed), decoder_norm=0.3)
    with torch.no_grad():
        for i, s in enumerate(sources):  # distinct decoder norms per source, for the relative norms
            m.decoder_weight(s.name).mul_(torch.linspace(0.5, 2.0, N_LATENTS)[:, None] ** (1 - 2 * i))
            m.input_scale[i] = (s.d / store.stats(s.name)["mean_sq_norm"]) ** 0.5
        x = {n: torch.from_numpy(store.read(n, 0, store.n_tokens)) for n in store.names}
        m.b_enc.copy_(-m.pre_activations(x).quantile(0.85, dim=0))
        m.b_enc[DEAD] = -1e3
        if arch == "batchtopk":
            m.threshold.fill_(0.05)
        if arch == "jumprelu":  # per-latent thresholds that cut part of each latent's activity
            m.set_thresholds(torch.linspace(0.0, 0.3, N_LATENTS))
    return m.eval()


def read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    store_path = write_store(root / "acts.zarr", tiny)
    store = open_store(store_path)
    model = sparse_crosscoder(sources_for(tiny), store)
    checkpoint = cc.save(model, root / "xc.safetensors")
    classes = root / "classes.jsonl"
    classes.write_text("".join(json.dumps({"latent": i, "class": ["shared", "a-only", "b-only"][i % 3],
                                           "norm": {"a": 0.1 * i, "b": None}, "rel_norm_B_over_A": 0.5}) + "\n"
                               for i in range(0, N_LATENTS, 2)))
    mp = pytest.MonkeyPatch()
    mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
    mp.setattr(db, "WINDOW_BUDGET", 2000)  # one batch per pass-3 group: exercises the grouping
    out = export(ExportConfig(checkpoint, root / "np", store=store_path, classes=classes, vectors=True,
                                    **ARGS))
    mp.undo()
    return {"root": root, "store": store_path, "checkpoint": checkpoint, "model": model, "out": out, "tiny": tiny,
            "classes": classes}


def config(setup, output, **kw) -> ExportConfig:
    args = dict(store=setup["store"], classes=setup["classes"], vectors=True, **ARGS)
    args.update(kw)
    return ExportConfig(setup["checkpoint"], output, **args)


def source_id(checkpoint: Path) -> str:
    """The Neuronpedia source id of layer 1 under the default set name: 1-xc-24-{8 hex digits of the checkpoint}."""
    return "1-" + default_set_name(N_LATENTS, crosscoder_id(checkpoint))


def source_dir(out: Path, model_id: str) -> Path:
    """The one source folder of a model in an export (its name holds the crosscoder's id)."""
    (folder,) = (out / "v1" / model_id).iterdir()
    return folder


def rows_by_index(out: Path, model_id: str, table: str) -> dict[int, list[dict]]:
    rows = {}
    for path in sorted((source_dir(out, model_id) / table).glob("batch-*.jsonl.gz")):
        for row in read_gz(path):
            rows.setdefault(int(row["index"]), []).append(row)
    return rows


# -- the numbers ------------------------------------------------------------------

def np_hash32(x):
    m = np.uint64(0xFFFFFFFF)
    x = x.astype(np.uint64) & m
    x = (((x >> np.uint64(16)) ^ x) * np.uint64(0x45D9F3B)) & m
    x = (((x >> np.uint64(16)) ^ x) * np.uint64(0x45D9F3B)) & m
    return (x >> np.uint64(16)) ^ x


def expected_samples(rows: np.ndarray, latent: int) -> list[int]:
    """The bottom-5 rows by the documented key hash32(hash32(row) ^ latent) * 2**31 + row."""
    keys = (np_hash32(np_hash32(rows) ^ np.uint64(latent)) << np.uint64(31)) | rows.astype(np.uint64)
    return sorted(rows[np.argsort(keys)][:5].tolist())


def test_exported_dashboards_equal_brute_force(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, out, store = setup["model"], setup["out"], open_store(setup["store"])
    x = {n: torch.from_numpy(store.read(n, 0, store.n_tokens)) for n in store.names}
    with torch.no_grad():
        dense = model.encode(x).numpy()  # every latent on every token at once
    ids = store.token_arrays()
    tokens, sequence = ids["tokens"], ids["sequence"]
    tokenizer = AutoTokenizer.from_pretrained(setup["tiny"]["tokenizer"])
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    n, before, after = store.n_tokens, 6, 1  # window 8: 6 tokens before the example, 1 after
    for model_id, source, folder in (("gpt2", "a.resid_post.1", "gpt2"), ("gpt2_b", "b.resid_post.1", "gpt2_b")):
        features = rows_by_index(out, model_id, "features")
        activations = rows_by_index(out, model_id, "activations")
        W_U = AutoModelForCausalLM.from_pretrained(setup["tiny"][folder]).get_output_embeddings().weight.detach()
        assert sorted(features) == list(range(N_LATENTS))
        for i in range(N_LATENTS):
            (feature,), col = features[i], dense[:, i]
            live = col > 0
            assert feature["frac_nonzero"] == pytest.approx(live.mean(), rel=1e-5)
            records = activations.get(i, [])
            if i == DEAD:
                assert not live.any() and records == [] and feature["freq_hist_data_bar_heights"] == []
                continue
            values = col[live]
            heights, _ = np.histogram(values, bins=50, range=(values.min(), values.max()))
            assert feature["freq_hist_data_bar_heights"] == heights.tolist()
            # Top examples: the 5 largest activations of the latent over the whole store, in order.
            top = [r for r in records if r["binMin"] == -1]
            expected = np.argsort(-col, kind="stable")[:min(5, live.sum())]
            assert [int(r["dataIndex"]) for r in top] == expected.tolist()
            assert feature["maxActApprox"] == pytest.approx(col.max(), rel=1e-5)
            for r in records:
                row, q = int(r["dataIndex"]), r["qualifyingTokenIndex"]
                window = np.arange(row - q, row - q + len(r["tokens"]))
                same = np.flatnonzero(sequence == sequence[row])
                assert window[0] == max(row - before, same[0]) and window[-1] == min(row + after, same[-1])
                assert r["tokens"] == [vocab[t] for t in tokens[window]]
                np.testing.assert_allclose(r["values"], col[window], rtol=1e-5, atol=1e-6)
            # Intervals of (0, max]: counts over all tokens, samples by the documented hash.
            interval = np.minimum(np.floor(col.astype(np.float64) / float(col.max()) * 5), 4)
            for j in range(5):
                members = np.flatnonzero(live & (interval == j))
                low = pytest.approx(j * col.max() / 5, rel=1e-5)
                got = [r for r in records if r["binMin"] != -1 and r["binMin"] == low]
                assert sorted(int(r["dataIndex"]) for r in got) == (expected_samples(members, i) if len(members)
                                                                    else [])
                for r in got:
                    assert r["binContains"] == pytest.approx(len(members) / n, rel=1e-5)
                    assert r["binMax"] == pytest.approx((j + 1) * col.max() / 5, rel=1e-5)
            # Logit lens of this source's decoder row, in raw units, through the model's unembedding.
            logits = (model.decoder_weight(source)[i] / model.scale(source)).detach() @ W_U.T
            best = logits.topk(10)
            np.testing.assert_allclose(feature["pos_values"], best.values.numpy(), rtol=1e-5)
            assert feature["pos_str"] == [vocab[t] for t in best.indices.tolist()]
            np.testing.assert_allclose(feature["neg_values"], logits.topk(10, largest=False).values.numpy(), rtol=1e-5)
            heights, _ = np.histogram(logits.double().numpy(), bins=50,
                                      range=(float(logits.min()), float(logits.max())))
            assert feature["logits_hist_data_bar_heights"] == heights.tolist()
            row = (model.decoder_weight(source)[i] / model.scale(source)).detach().numpy()
            np.testing.assert_allclose(feature["vector"], row, rtol=1e-5, atol=1e-9)
            largest = np.argsort(-row)[:3]
            assert feature["neuron_alignment_indices"] == largest.tolist()
            np.testing.assert_allclose(feature["neuron_alignment_l1"], np.abs(row[largest]) / np.abs(row).sum(),
                                       rtol=1e-5)


def test_sidecar_and_notes_carry_the_crosscoder_facts(setup):
    model, out = setup["model"], setup["out"]
    norms = model.decoder_norms().detach().numpy()
    rows = [json.loads(line) for line in (out / SIDECAR).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N_LATENTS))
    for r in rows:
        i = r["index"]
        np.testing.assert_allclose(list(r["decoder_norm"].values()), norms[i], rtol=1e-5)
        np.testing.assert_allclose(list(r["relative_norm"].values()), norms[i] / norms[i].sum(), rtol=1e-5)
        if i % 2 == 0:
            assert r["class"] == ["shared", "a-only", "b-only"][i % 3]
            assert r["classify"]["norm"] == {"a": pytest.approx(0.1 * i), "b": None}
        else:
            assert r["class"] is None and r["classify"] is None
    source = json.loads((source_dir(out, "gpt2") / "source.jsonl").read_text())
    assert "xc-latents.jsonl" in source["notes"] and "unclassified 12" in source["notes"]


def test_latent_encoder_on_a_subset_equals_the_full_encode(setup):
    store = open_store(setup["store"])
    x = {n: store.read(n, 0, 50) for n in store.names}
    chosen = np.array([1, 4, 7, 20])
    for arch, k in (("relu", None), ("batchtopk", 3), ("topk", 3), ("jumprelu", None)):
        model = sparse_crosscoder(sources_for(setup["tiny"]), store, arch, k)
        full = model.encode({n: torch.from_numpy(v) for n, v in x.items()}).detach()
        assert full[:, chosen].count_nonzero() > 0
        part = db.LatentEncoder(model, chosen, torch.device("cpu"))(x)
        torch.testing.assert_close(part, full[:, chosen], rtol=1e-5, atol=1e-6)


def test_token_strings_show_byte_level_and_sentencepiece_spaces():
    class Pieces:
        def __len__(self):
            return 4

        def convert_ids_to_tokens(self, ids):
            return ["\u0120the", "\u010a", "\u2581dog", None]

    assert ex.token_strings(Pieces()) == [" the", "\n", " dog", ""]


def test_round_sig_keeps_six_significant_digits():
    values = np.array([0.0, 1.0, -2.5, 123456789.0, 1.23456789e-7, -9.99999951, 0.30000001])
    assert ex.round_sig(values) == [float(f"{v:.6g}") for v in values]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_unembedding_is_read_from_the_files_as_the_model_has_it(tiny, family):
    from transformers import AutoModelForCausalLM

    expected = AutoModelForCausalLM.from_pretrained(tiny[family]).get_output_embeddings().weight.detach()
    torch.testing.assert_close(read_unembedding(Path(tiny[family])), expected)


def test_models_are_found_through_the_harvest_record(setup, tmp_path):
    """Sources named by alias (as xc harvest writes them): paths come from attrs["xc"]["harvest"]["models"]."""
    import zarr

    store_path = shutil.copytree(setup["store"], tmp_path / "acts.zarr")
    group = zarr.open_group(str(store_path), mode="r+")
    meta = dict(group.attrs["xc"])
    meta["harvest"] = {"models": [{"alias": "base", "id": str(setup["tiny"]["gpt2"]), "revision": None},
                                  {"alias": "chat", "id": str(setup["tiny"]["gpt2_b"]), "revision": None}]}
    group.attrs["xc"] = meta
    aliased = [Source(s.name, alias, s.site, s.layer, s.d) for s, alias in zip(sources_for(setup["tiny"]),
                                                                                ("base", "chat"))]
    model = sparse_crosscoder(aliased, open_store(store_path))
    ckpt = cc.save(model, tmp_path / "xc.safetensors")
    out = export(ExportConfig(ckpt, tmp_path / "np", store=store_path, features="3,7-9", batch_size=3,
                                    top_k=2, model_ids=("base=gpt2-small",)))
    assert sorted(p.name for p in (out / "v1").iterdir()) == ["chat", "gpt2-small"]
    rows = [r for p in sorted((source_dir(out, "gpt2-small") / "features").iterdir()) for r in read_gz(p)]
    assert [r["index"] for r in rows] == ["3", "7", "8", "9"] and all(len(r["pos_str"]) == 10 for r in rows)
    assert npd.check_export(out)["features"] == 8


def test_source_ids_follow_layers_and_sites():
    model = cc.Crosscoder([Source("m.resid_post.4", "m", "resid_post", 4, 8), Source("m.resid_post.6", "m",
                           "resid_post", 6, 8), Source("m.mlp_out.6", "m", "mlp_out", 6, 8),
                           Source("n.resid_post.6", "other/n", "resid_post", 6, 8)], 16, "relu")
    slices = plan_slices(model, "xc-16", {})
    assert [(x.model_id, x.source_id, x.hook_name) for x in slices] == [
        ("m", "4-xc-16", "blocks.4.hook_resid_post"), ("m", "6-xc-16__resid_post", "blocks.6.hook_resid_post"),
        ("m", "6-xc-16__mlp_out", "blocks.6.hook_mlp_out"), ("n", "6-xc-16", "blocks.6.hook_resid_post")]
    assert all(npd.SOURCE_ID.match(x.source_id) for x in slices)


# -- the format -----------------------------------------------------------------

def test_every_file_loads_and_check_passes(setup):
    out = setup["out"]
    for path in out.rglob("*.jsonl.gz"):
        rows = read_gz(path)
        assert rows and all(list(r) == list(rows[0]) for r in rows)
    for path in out.rglob("*.jsonl"):
        assert all(json.loads(line) for line in path.read_text().splitlines())
    result = CliRunner().invoke(cli, ["export", "--check", str(out)])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["features"] == 2 * N_LATENTS and summary["activations"] > 0 and summary["warnings"] == []
    sid = source_id(setup["checkpoint"])
    assert {(s["modelId"], s["sourceId"]) for s in summary["sources"]} == {("gpt2", sid), ("gpt2_b", sid)}


def rewrite_gz(path: Path, change) -> None:
    rows = read_gz(path)
    rows = change(rows) or rows
    with gzip.open(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def set_first(key, value):
    def change(rows):
        rows[0][key] = value
    return change


CORRUPTIONS = {
    "nan": ("activations", set_first("maxValue", float("nan")), "not valid JSON"),
    "float index": ("activations", set_first("maxValueTokenIndex", 3.0), "maxValueTokenIndex must be an integer"),
    "missing key": ("activations", lambda rows: [rows[0]] + [{k: v for k, v in r.items() if k != "minValue"}
                                                              for r in rows[1:]], "other keys than line 1"),
    "wrong max": ("activations", set_first("maxValue", 1e6), "maxValue is 1000000.0"),
    "orphan": ("activations", set_first("index", "999"), "feature 999, which is not in features/"),
    "int index": ("features", set_first("index", 3), "index must be a string"),
    "density": ("features", set_first("frac_nonzero", 1.5), "frac_nonzero 1.5"),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_check_fails_on_a_corrupted_export(setup, tmp_path, name):
    table, change, message = CORRUPTIONS[name]
    out = shutil.copytree(setup["out"], tmp_path / "np")
    rewrite_gz(source_dir(out, "gpt2") / table / "batch-1.jsonl.gz", change)
    result = CliRunner().invoke(cli, ["export", "--check", str(out)])
    assert result.exit_code == 2 and result.stdout == ""
    assert message in result.stderr.splitlines()[0], result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["unknown metadata key", "not gzipped", "truncated", "missing batch"])
def test_check_fails_on_a_broken_layout(setup, tmp_path, name):
    out = shutil.copytree(setup["out"], tmp_path / "np")
    source = source_dir(out, "gpt2_b")
    batch = source / "features" / "batch-2.jsonl.gz"
    if name == "unknown metadata key":
        row = json.loads((source / "source.jsonl").read_text())
        (source / "source.jsonl").write_text(json.dumps({**row, "crosscoder": True}) + "\n")
        message = "unknown column(s) crosscoder"
    elif name == "not gzipped":
        batch.rename(source / "features" / "batch-2.jsonl")
        message = "not named batch-N.jsonl.gz"
    elif name == "truncated":
        batch.write_bytes(batch.read_bytes()[:40])
        message = "cannot be read as gzip"
    else:
        batch.unlink()
        message = "has no features/batch-2.jsonl.gz beside it"
    result = CliRunner().invoke(cli, ["export", "--check", str(out)])
    assert result.exit_code == 2
    assert message in result.stderr, result.stderr


# -- what Neuronpedia's importer needs --------------------------------------------------------

SCHEMA_PLACES = [os.environ.get("XC_NEURONPEDIA_SCHEMA"), Path(__file__).parent / "neuronpedia" / "schema.prisma"]
TABLES = {"release": "SourceRelease", "model": "Model", "sourceset": "SourceSet", "source": "Source",
          "features": "Neuron", "activations": "Activation", "explanations": "Explanation"}
PRISMA_KINDS = {"String": "str", "Int": "int", "Float": "float", "Boolean": "bool", "DateTime": "datetime",
                "Json": "any", "Visibility": "visibility"}
# The README beside schema.prisma lists these (NOT NULL, no database default); it was read from the schema.
README_NOT_NULL = {
    "model": {"id", "creatorId", "layers", "neuronsPerLayer", "owner"},
    "release": {"name", "description", "creatorName", "creatorId"},
    "sourceset": {"modelId", "name", "description", "creatorName", "creatorId"},
    "source": {"id", "modelId", "setName", "creatorId"},
    "features": {"modelId", "layer", "index"},
    "activations": {"id", "modelId", "layer", "index", "maxValue", "maxValueTokenIndex", "minValue", "creatorId"},
}


def prisma_columns(schema: str, model: str) -> dict[str, tuple[str | None, bool]]:
    """Scalar fields of a Prisma model: name -> (our column kind, NOT NULL without a database default).

    Relation fields (their type is another model) are not columns. Lists are nullable columns in Prisma's
    PostgreSQL tables. cuid() and uuid() defaults are filled in by Prisma's client, not by the database."""
    import re

    body = re.search(rf"^model {model} \{{(.*?)^\}}", schema, re.S | re.M).group(1)
    enums = set(re.findall(r"^enum (\w+) \{", schema, re.M))
    columns = {}
    for line in body.splitlines():
        line = re.sub(r'Unsupported\("[^"]*"\)', "Unsupported", line.split("//")[0].strip())
        match = re.match(r"(\w+)\s+(\w+)(\[\]|\?)?\s*(.*)", line)
        if not match or line.startswith("@@"):
            continue
        name, base, modifier, attributes = match.groups()
        if base not in PRISMA_KINDS and base not in enums and base != "Unsupported":
            continue  # a relation
        kind = None if base == "Unsupported" else PRISMA_KINDS.get(base, base.lower())
        if kind and modifier == "[]":
            kind = f"[{kind}]"
        elif kind and modifier == "?":
            kind += "?"
        db_default = "@default(" in attributes and not re.search(r"@default\((cuid|uuid)\(\)\)", attributes)
        columns[name] = (kind, modifier is None and not db_default)
    return columns


def checker_columns(table: str) -> dict:
    return npd.METADATA_COLUMNS[table] if table in npd.METADATA_COLUMNS else npd.DATA_TABLES[table][0]


def test_the_checkers_columns_and_not_null_sets_are_the_schemas():
    path = next((Path(p) for p in SCHEMA_PLACES if p and Path(p).is_file()), None)
    if path is None:
        pytest.skip("Neuronpedia's schema.prisma is not here (set XC_NEURONPEDIA_SCHEMA)")
    schema = path.read_text()
    for table, model in TABLES.items():
        columns = prisma_columns(schema, model)
        assert set(npd.NOT_NULL[table]) == {n for n, (_, required) in columns.items() if required}, table
        ours = checker_columns(table)
        assert set(ours) == set(columns), table
        for name, (kind, _) in columns.items():
            assert kind is None or ours[name] == kind, (table, name)


def test_the_checkers_not_null_sets_are_the_readmes():
    for table, required in README_NOT_NULL.items():
        assert set(npd.NOT_NULL[table]) == required, table
    assert npd.DATA_TABLES["activations"][1] == npd.NOT_NULL["activations"]


def metadata_row(out: Path, model_id: str, name: str) -> dict:
    return json.loads((source_dir(out, model_id) / f"{name}.jsonl").read_text())


def test_metadata_rows_load_on_a_fresh_instance(setup):
    out = setup["out"]
    rows = {m: {name: metadata_row(out, m, name) for name in npd.METADATA_FILES} for m in ("gpt2", "gpt2_b")}
    for m, meta in rows.items():
        for name, row in meta.items():
            assert all(row.get(k) is not None for k in npd.NOT_NULL[name]), (m, name)
            assert set(row) <= set(npd.METADATA_COLUMNS[name]), (m, name)
        # The model row is inserted before its source set and source: it names neither.
        assert meta["model"]["defaultSourceSetName"] is None and meta["model"]["defaultSourceId"] is None
        assert meta["source"]["dataset"] is None or not npd.local_path(meta["source"]["dataset"])
    assert rows["gpt2"]["release"] == rows["gpt2_b"]["release"]  # created once, from whichever folder comes first
    assert rows["gpt2"]["sourceset"]["description"] == rows["gpt2_b"]["sourceset"]["description"]


def test_a_local_corpus_is_published_by_name():
    assert ex.public_dataset("/home/me/corpora/pile-10k.txt") == "pile-10k.txt"
    assert ex.public_dataset("NeelNanda/pile-10k") == "NeelNanda/pile-10k"
    assert ex.public_dataset("synthetic") == "synthetic"
    assert ex.public_dataset("-") is None and ex.public_dataset(None) is None


def activation_ids(out: Path) -> set[str]:
    return {r["id"] for p in out.rglob("activations/batch-*.jsonl.gz") for r in read_gz(p)}


def feature_keys(out: Path) -> set[tuple]:
    return {(r["modelId"], r["layer"], r["index"]) for p in out.rglob("features/batch-*.jsonl.gz") for r in read_gz(p)}


def test_two_crosscoders_never_collide_and_a_reexport_is_idempotent(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    subset = dict(features="0-6", top_k=2, window=4, batch_size=7)
    # The same crosscoder saved again, with other training metadata: the same names and ids.
    again = cc.save(setup["model"], tmp_path / "again.safetensors", extra={"training": {"steps": 123}})
    assert crosscoder_id(again) == crosscoder_id(setup["checkpoint"])
    first = export(ExportConfig(setup["checkpoint"], tmp_path / "first", store=setup["store"], **subset))
    same = export(ExportConfig(again, tmp_path / "same", store=setup["store"], **subset))
    assert sorted(p.relative_to(same) for p in same.rglob("*.jsonl*")) == \
           sorted(p.relative_to(first) for p in first.rglob("*.jsonl*"))
    assert activation_ids(same) == activation_ids(first) and activation_ids(first)
    # Another crosscoder of the same width over the same models: another set name, no shared row.
    other = cc.save(sparse_crosscoder(sources_for(setup["tiny"]), open_store(setup["store"]), seed=1),
                    tmp_path / "other.safetensors")
    second = export(ExportConfig(other, tmp_path / "second", store=setup["store"], **subset))
    assert source_dir(second, "gpt2").name != source_dir(first, "gpt2").name
    assert not feature_keys(second) & feature_keys(first)
    assert not activation_ids(second) & activation_ids(first)
    assert metadata_row(second, "gpt2", "release")["name"] != metadata_row(first, "gpt2", "release")["name"]
    # --set-name names the set; activation ids still differ between crosscoders.
    named = [export(ExportConfig(ckpt, tmp_path / f"named-{n}", store=setup["store"], set_name="mine", **subset))
             for n, ckpt in enumerate((setup["checkpoint"], other))]
    assert source_dir(named[0], "gpt2").name == source_dir(named[1], "gpt2").name == "1-mine"
    assert not activation_ids(named[0]) & activation_ids(named[1])


def test_the_writer_keeps_folders_under_the_listing_limit_and_temp_files_out_of_v1(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(npd, "MAX_FILES", 3)  # 24 features at --batch-size 7 would be 4 files per folder
    renames, real_replace = [], os.replace

    def replace(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(npd.os, "replace", replace)
    out = tmp_path / "np"
    result = CliRunner().invoke(cli, ["export", str(setup["checkpoint"]), "--store", str(setup["store"]), "-o",
                                      str(out), "--top-k", "2", "--window", "4", "--batch-size", "7"])
    assert result.exit_code == 0, result.stderr
    assert "--batch-size 7 would put 4 files in a folder" in result.stderr and "writing 8 features per file" in \
        result.stderr
    for folder in out.rglob("*"):
        if folder.name in ("features", "activations"):
            assert len(list(folder.iterdir())) <= 3
    assert json.loads((out / "xc-export.json").read_text())["features_per_file"] == 8
    batch_renames = [(src, dst) for src, dst in renames if (out / "v1") in dst.parents]
    assert batch_renames and all((out / "v1") not in src.parents for src, _ in batch_renames)
    assert not (out / npd.TEMP_DIR).exists()
    assert npd.check_export(out)["features"] == 2 * N_LATENTS


def edit_row(path: Path, change) -> None:
    row = json.loads(path.read_text())
    path.write_text(json.dumps(change(row) or row) + "\n")


def without(*keys):
    return lambda row: {k: v for k, v in row.items() if k not in keys}


def with_values(**values):
    return lambda row: {**row, **values}


def edit_gz_text(path: Path, change) -> None:
    with gzip.open(path, "rt") as f:
        text = f.read()
    with gzip.open(path, "wt") as f:
        f.write(change(text))


def plant_too_many_files(out: Path) -> None:
    """4 batch files in gpt2's features/ with a limit of 3 (set by the test); every other folder down to 3."""
    (out / "xc-export.json").unlink()  # the manifest would miss the deleted batches
    for path in (source_dir(out, "gpt2_b") / "features" / "batch-3.jsonl.gz",
                 source_dir(out, "gpt2_b") / "activations" / "batch-3.jsonl.gz",
                 source_dir(out, "gpt2") / "activations" / "batch-3.jsonl.gz"):
        path.unlink()


PLANTED = {
    "model names its default source set": (
        lambda out: edit_row(source_dir(out, "gpt2") / "model.jsonl", with_values(
            defaultSourceSetName=source_dir(out, "gpt2").name[2:], defaultSourceId=source_dir(out, "gpt2").name)),
        "defaultSourceSetName, defaultSourceId must be null"),
    "model without layers, owner, creatorId": (
        lambda out: edit_row(source_dir(out, "gpt2") / "model.jsonl", without("layers", "owner", "creatorId")),
        "required column(s) creatorId, layers, owner missing"),
    "release without creatorName": (
        lambda out: edit_row(source_dir(out, "gpt2") / "release.jsonl", without("creatorName")),
        "required column(s) creatorName missing"),
    "sourceset without description": (
        lambda out: edit_row(source_dir(out, "gpt2") / "sourceset.jsonl", without("description")),
        "required column(s) description missing"),
    "source without creatorId": (
        lambda out: edit_row(source_dir(out, "gpt2") / "source.jsonl", without("creatorId")),
        "required column(s) creatorId missing"),
    "release with a relation key": (
        lambda out: edit_row(source_dir(out, "gpt2") / "release.jsonl", with_values(sourceSets=[])),
        "unknown column(s) sourceSets (the importer's Prisma create would fail)"),
    "model with Infinity": (
        lambda out: (source_dir(out, "gpt2") / "model.jsonl").write_text(
            (source_dir(out, "gpt2") / "model.jsonl").read_text().replace('"dimension": 32', '"dimension": Infinity')),
        "Infinity is not valid JSON"),
    "activations without max and min": (
        lambda out: rewrite_gz(source_dir(out, "gpt2") / "activations" / "batch-1.jsonl.gz", lambda rows: [
            without("maxValue", "minValue", "maxValueTokenIndex")(r) for r in rows]),
        "required column(s) maxValue, maxValueTokenIndex, minValue missing"),
    "activations without creatorId": (
        lambda out: rewrite_gz(source_dir(out, "gpt2") / "activations" / "batch-1.jsonl.gz", lambda rows: [
            without("creatorId")(r) for r in rows]),
        "required column(s) creatorId missing"),
    "a number past a double": (
        lambda out: edit_gz_text(source_dir(out, "gpt2") / "features" / "batch-1.jsonl.gz",
                                 lambda text: text.replace('"maxActApprox": ', '"maxActApprox": 1e999, "x": ', 1)),
        "1e999 is out of range of a double"),
    "an integer past 32 bits": (
        lambda out: rewrite_gz(source_dir(out, "gpt2") / "activations" / "batch-1.jsonl.gz",
                               set_first("maxValueTokenIndex", 1 << 31)),
        "maxValueTokenIndex must be an integer of 32 bits, not 2147483648"),
    "too many files": (plant_too_many_files, "features: holds 4 files; the importer lists at most 3 keys"),
    "a temp file in features": (
        lambda out: (source_dir(out, "gpt2") / "features" / ".batch-3.jsonl.gz.tmp-4242-0123abcd").write_bytes(b"x"),
        "is a temp file left by an interrupted write"),
    "a temp metadata file": (
        lambda out: (source_dir(out, "gpt2_b") / ".source.jsonl.tmp-4242-0123abcd").write_text("{"),
        "is a temp file left by an interrupted write"),
    "release rows differ": (
        lambda out: edit_row(source_dir(out, "gpt2_b") / "release.jsonl", with_values(description="another")),
        "release.jsonl in description; the importer creates this release row once"),
    "a local dataset path": (
        lambda out: edit_row(source_dir(out, "gpt2") / "source.jsonl", with_values(dataset="/home/me/corpus.txt")),
        "dataset '/home/me/corpus.txt' publishes a local path"),
    "a feature of another set": (
        lambda out: rewrite_gz(source_dir(out, "gpt2") / "features" / "batch-1.jsonl.gz",
                               set_first("sourceSetName", "other")),
        "sourceSetName 'other' is not the set"),
}


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_check_reports_what_the_importer_rejects_or_skips(setup, tmp_path, monkeypatch, name):
    plant, message = PLANTED[name]
    out = shutil.copytree(setup["out"], tmp_path / "np")
    if name == "too many files":
        monkeypatch.setattr(npd, "MAX_FILES", 3)
    plant(out)
    with pytest.raises(npd.ExportProblems) as caught:
        npd.check_export(out)
    assert len(caught.value.problems) == 1 and message in caught.value.problems[0], caught.value.problems
    result = CliRunner().invoke(cli, ["export", "--check", str(out)])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert message in result.stderr.splitlines()[0], result.stderr


# -- resume -----------------------------------------------------------------------

def test_rerun_skips_finished_batches(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    out = shutil.copytree(setup["out"], tmp_path / "np")
    setup_args = ["export", str(setup["checkpoint"]), "--store", str(setup["store"]), "-o", str(out), "--top-k", "5",
                  "--batch-size", "7", "--window", "8", "--classes", str(setup["classes"]), "--vectors"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("batch-*.jsonl.gz")}
    result = CliRunner().invoke(cli, setup_args)  # complete, same arguments: nothing to do
    assert result.exit_code == 0 and result.stdout == f"{out}\n", result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("batch-*.jsonl.gz")} == before
    gone = [source_dir(out, "gpt2") / t / "batch-2.jsonl.gz" for t in ("features", "activations")]
    for path in gone:
        path.unlink()
    # What a killed run leaves: temp files beside v1/, and inside it where an older xc wrote them. Both go.
    (out / npd.TEMP_DIR).mkdir()
    (out / npd.TEMP_DIR / "batch-2.jsonl.gz.4242-0123abcd").write_bytes(b"half")
    (source_dir(out, "gpt2") / "features" / ".batch-2.jsonl.gz.tmp-4242-0123abcd").write_bytes(b"half")
    result = CliRunner().invoke(cli, setup_args + ["--resume"])
    assert result.exit_code == 0, result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("batch-*.jsonl.gz") if p not in gone} == \
           {p: t for p, t in before.items() if p not in gone}
    assert tree_bytes(out) == tree_bytes(setup["out"])


def test_an_interrupted_export_resumes_to_identical_files(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    out = tmp_path / "np"
    real_write, calls = ex.write_batch, []

    def write_then_stop(*args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(args[3])
        real_write(*args)

    monkeypatch.setattr(ex, "write_batch", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        export(config(setup, out))
    monkeypatch.setattr(ex, "write_batch", real_write)
    assert sorted(p.name for p in (source_dir(out, "gpt2") / "features").iterdir()) == \
           ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    with pytest.raises(npd.ExportProblems, match="incomplete"):
        npd.check_export(out)
    with pytest.raises(BadInput, match="--resume"):
        export(config(setup, out))
    # The statistics of passes 1 and 2 were saved: a resumed run does not redo them.
    monkeypatch.setattr(db, "first_pass", lambda *a: pytest.fail("pass 1 ran again"))
    monkeypatch.setattr(db, "second_pass", lambda *a: pytest.fail("pass 2 ran again"))
    export(config(setup, out, resume=True))
    assert tree_bytes(out) == tree_bytes(setup["out"])


def test_an_export_killed_with_sigkill_resumes_to_identical_files(setup, tmp_path):
    out = tmp_path / "np"
    slow = ("import sys, time; import xcli.export.neuronpedia as e; w = e.write_batch\n"
            "def slow(*a):\n    w(*a); time.sleep(1.0)\n"
            "e.write_batch = slow\nfrom xcli.cli import main\nsys.argv[0] = 'xc'\nmain()\n")
    args = ["export", str(setup["checkpoint"]), "--store", str(setup["store"]), "-o", str(out), "--top-k", "5",
            "--batch-size", "7", "--window", "8", "--classes", str(setup["classes"]), "--vectors"]
    env = {**os.environ, "SOURCE_DATE_EPOCH": EPOCH}
    proc = subprocess.Popen([sys.executable, "-c", slow, *args], env=env, stderr=subprocess.PIPE)
    first = out / "v1" / "gpt2_b" / source_id(setup["checkpoint"]) / "features" / "batch-0.jsonl.gz"
    deadline = time.time() + 60
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert not (source_dir(out, "gpt2") / "features" / "batch-3.jsonl.gz").exists()
    done = subprocess.run([sys.executable, "-m", "xcli", *args, "--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{out}\n"
    assert tree_bytes(out) == tree_bytes(setup["out"])


# -- bad input --------------------------------------------------------------------

BAD = {
    "no checkpoint": (["export", "{root}/none.safetensors", "--store", "{store}", "-o", "{out}"], "does not exist"),
    "no store": (["export", "{ckpt}", "--store", "{root}/none.zarr", "-o", "{out}"], "does not exist"),
    "features": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--features", "0-99"], "--features"),
    "set name": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--set-name", "Bad Name"], "--set-name"),
    "top-k": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--top-k", "0"], "--top-k"),
    "classes": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--classes", "{root}/bad.jsonl"],
                "line 2"),
    "model path": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--model-path",
                    "{tiny}/gpt2=/no/such/model"], "does not exist; or pass --model-path"),
    "hub tokenizer": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--tokenizer", "nobody/no-tokenizer"],
                      "offline"),
    "bare model id": (["export", "{ckpt}", "--store", "{store}", "-o", "{out}", "--model-id", "gpt2-small"],
                      "must say which model"),
    "no store option": (["export", "{ckpt}", "-o", "{out}"], "--store is needed"),
    "other sources": (["export", "{other}", "--store", "{store}", "-o", "{out}"], "has no source 'c.resid_post.1'"),
    "check a file": (["export", "--check", "{ckpt}"], "is not a folder"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_exits_2_and_leaves_nothing(setup, tmp_path, name):
    (tmp_path / "bad.jsonl").write_text('{"latent": 1, "class": "shared"}\n{"latent": 99, "class": "x"}\n')
    other = cc.Crosscoder([Source("c.resid_post.1", "gpt2", "resid_post", 1, 32)], 8, "relu")
    cc.save(other, tmp_path / "other.safetensors")
    fields = {"root": tmp_path, "store": setup["store"], "ckpt": setup["checkpoint"], "out": tmp_path / "np",
              "tiny": Path(setup["tiny"]["gpt2"]).parent, "other": tmp_path / "other.safetensors"}
    args, message = BAD[name]
    result = CliRunner().invoke(cli, [a.format(**fields) for a in args])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "np").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "other.safetensors"]


def test_a_checkpoint_with_nan_is_bad_input(setup, tmp_path):
    model = sparse_crosscoder(sources_for(setup["tiny"]), open_store(setup["store"]))
    with torch.no_grad():
        model.encoder_weight("a.resid_post.1")[0, 3] = float("nan")
    ckpt = cc.save(model, tmp_path / "nan.safetensors")
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--store", str(setup["store"]), "-o", str(tmp_path / "np")])
    assert result.exit_code == 2 and "non-finite" in result.stderr and "Traceback" not in result.stderr
    assert "nan.safetensors" in result.stderr and not (tmp_path / "np").exists()


def test_an_existing_folder_is_not_clobbered(setup, tmp_path):
    out = tmp_path / "np"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(cli, ["export", str(setup["checkpoint"]), "--store", str(setup["store"]),
                                      "-o", str(out)])
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    result = CliRunner().invoke(cli, ["export", str(setup["checkpoint"]), "--store", str(setup["store"]),
                                      "-o", str(out), "--features", "0-2", "--overwrite"])
    # --overwrite replaces only an xc export: a folder of someone else's files stays as it is
    assert result.exit_code == 2 and "is not an xc export folder" in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    out.rmdir()
    for features, n in (("0-2", 6), ("0-1", 4)):  # an xc export it does replace
        result = CliRunner().invoke(cli, ["export", str(setup["checkpoint"]), "--store", str(setup["store"]),
                                          "-o", str(out), "--features", features, "--overwrite"])
        assert result.exit_code == 0, result.stderr
        assert npd.check_export(out)["features"] == n


def test_a_dfc_checkpoint_exports_and_its_dedicated_latents_write_one_model(setup, tmp_path):
    """A crosscoder with tied and dedicated latents (xc train --shared-latents/--exclusive) exports as any other."""
    from xcli.crosscoder.partition import Partition

    sources = sources_for(setup["tiny"])
    model = sparse_crosscoder(sources, open_store(setup["store"]))
    model.partition = Partition.layout(4, {sources[0].model: 3, sources[1].model: 3})
    model.partition.enforce(model)
    ckpt = cc.save(model, tmp_path / "dfc.safetensors")
    out = export(ExportConfig(ckpt, tmp_path / "np", store=setup["store"], features="0-9", **ARGS))
    assert npd.check_export(out)["features"] == 20
    assert cc.load(ckpt).metadata["partition"]["dedicated"][1] == {"model": sources[1].model, "start": 7, "stop": 10}
