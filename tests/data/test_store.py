import json
import os

import numpy as np
import pytest
import zarr

from xcli.data import store as st
from xcli.errors import BadInput


def sources(d=(8, 12)):
    return [st.Source(name=f"m{i}.resid_post.1", model=f"m{i}", site="resid_post", layer=1, d=di)
            for i, di in enumerate(d)]


def write(path, rows, srcs, chunk_rows=16, dtype="float32", batches=7, seed=0, **kw):
    rng = np.random.default_rng(seed)
    data = {s.name: rng.normal(size=(rows, s.d)).astype(np.float32) for s in srcs}
    w = st.StoreWriter(path, srcs, {"tokenizer": "t"}, dtype=dtype, chunk_rows=chunk_rows, **kw)
    bounds = np.linspace(0, rows, batches + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        w.append({n: x[a:b] for n, x in data.items()}, tokens=np.arange(a, b), sequence=np.arange(a, b) // 10,
                 position=np.arange(a, b) % 10)
    w.close()
    return data


@pytest.mark.parametrize("dtype,atol", [("float32", 0), ("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_roundtrip_and_metadata(tmp_path, dtype, atol):
    srcs = sources()
    data = write(tmp_path / "s.zarr", 100, srcs, dtype=dtype)
    store = st.open_store(tmp_path / "s.zarr")
    assert store.complete and store.n_tokens == 100 and store.names == [s.name for s in srcs]
    assert store.meta["format"] == "activations" and store.meta["version"] == 1
    assert store.n_chunks == 7 and store.chunk_rows == 16
    for s in srcs:
        got = store.read(s.name, 0, 100)
        assert got.dtype == np.float32 and got.shape == (100, s.d)
        np.testing.assert_allclose(got, data[s.name], atol=atol, rtol=atol)
    ids = store.token_arrays()
    assert ids["tokens"].tolist() == list(range(100)) and ids["position"][:12].tolist() == [*range(10), 0, 1]


def test_stored_stats_equal_brute_force(tmp_path):
    srcs = sources()
    write(tmp_path / "s.zarr", 50, srcs, dtype="float16")
    store = st.open_store(tmp_path / "s.zarr")
    for s in srcs:
        rows = store.read(s.name, 0, 50).astype(np.float64)
        stats = store.stats(s.name)
        assert stats["count"] == 50
        np.testing.assert_allclose(stats["mean"], rows.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats["mean_sq_norm"], (rows ** 2).sum(1).mean(), rtol=1e-12)


def test_bf16_bits_are_lossless_for_bf16_values():
    values = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    bits = st.float32_to_bf16_bits(values)
    widened = st.bf16_bits_to_float32(bits)
    assert np.array_equal(st.float32_to_bf16_bits(widened), bits)  # bf16 -> store -> bf16 is exact
    import torch

    assert np.array_equal(widened, torch.from_numpy(values).bfloat16().float().numpy())  # same rounding as torch


def test_resume_after_a_partial_write_equals_one_pass(tmp_path):
    srcs = sources()
    rng = np.random.default_rng(1)
    data = {s.name: rng.normal(size=(80, s.d)).astype(np.float32) for s in srcs}
    w = st.StoreWriter(tmp_path / "a.zarr", srcs, chunk_rows=16)
    w.append({n: x[:40] for n, x in data.items()})  # two chunks committed, 8 rows buffered and lost
    assert st.open_store(tmp_path / "a.zarr").n_tokens == 32
    assert not st.open_store(tmp_path / "a.zarr").complete
    w = st.StoreWriter(tmp_path / "a.zarr", srcs, resume=True)
    w.append({n: x[32:] for n, x in data.items()})
    w.close()
    one_pass = tmp_path / "b.zarr"
    w = st.StoreWriter(one_pass, srcs, chunk_rows=16)
    w.append(data)
    w.close()
    a, b = st.open_store(tmp_path / "a.zarr"), st.open_store(one_pass)
    for s in srcs:
        assert np.array_equal(a.read(s.name, 0, 80), b.read(s.name, 0, 80))
        assert np.array_equal(a.stats(s.name)["mean"], b.stats(s.name)["mean"])
    assert a.meta["stats"] == b.meta["stats"]


def test_reader_accepts_a_foreign_store_without_stats_or_tokens(tmp_path):
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    x = np.random.default_rng(2).normal(size=(30, 4)).astype(np.float16)
    g.create_array("acts/layer3", data=x, chunks=(8, 4))
    store = st.open_store(tmp_path / "f.zarr")
    assert store.names == ["layer3"] and store.n_tokens == 30 and store.token_arrays() is None
    stats = store.stats("layer3")
    np.testing.assert_allclose(stats["mean"], x.astype(np.float64).mean(0), rtol=1e-12)


def test_bad_inputs(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        st.open_store(tmp_path / "missing.zarr")
    bad = [st.Source(name="a/b", model="m", site="s", layer=0, d=4)]
    with pytest.raises(BadInput, match="not valid"):
        st.StoreWriter(tmp_path / "x.zarr", bad)
    dup = sources((4, 4))[:1] * 2
    with pytest.raises(BadInput, match="unique"):
        st.StoreWriter(tmp_path / "x.zarr", dup)
    with pytest.raises(BadInput, match="dtype"):
        st.StoreWriter(tmp_path / "x.zarr", sources(), dtype="int8")
    write(tmp_path / "s.zarr", 10, sources())
    with pytest.raises(BadInput, match="not in"):
        st.open_store(tmp_path / "s.zarr").source("nope")


@pytest.mark.parametrize("sharded", [False, True])
def test_xarray_opens_a_store_with_the_values_of_xcs_reader(tmp_path, sharded):
    """Every array has Zarr v3 dimension names: rows share "token", a source's width is "<source>.d"."""
    import xarray as xr  # in the [test] extra: a client of the store, never skipped
    srcs, path = sources(), tmp_path / "s.zarr"
    if sharded:  # the create path of several writers (xc harvest under torchrun)
        rng = np.random.default_rng(3)
        st.create_sharded(path, srcs, {"tokenizer": "t"}, dtype="float32", chunk_rows=16)
        writer = st.ChunkWriter(path)
        for index, rows in enumerate((16, 16, 8)):
            writer.write(index, {s.name: rng.normal(size=(rows, s.d)).astype(np.float32) for s in srcs},
                         {k: np.arange(index * 16, index * 16 + rows) for k in ("tokens", "sequence", "position")})
        st.finish_sharded(path, 40)
    else:
        write(path, 40, srcs)
    store = st.open_store(path)
    group = zarr.open_group(str(path), mode="r")
    for s in srcs:
        assert group[f"acts/{s.name}"].metadata.dimension_names == ("token", f"{s.name}.d")
        assert group[f"stats/{s.name}/mean"].metadata.dimension_names == (f"{s.name}.d",)
    root = xr.open_zarr(path, consolidated=False)
    assert dict(root.sizes) == {"token": 40}
    ids = store.token_arrays()
    for name in ("tokens", "sequence", "position"):
        assert root[name].dims == ("token",) and np.array_equal(root[name].values, ids[name])
    acts = xr.open_zarr(path, group="acts", consolidated=False)
    for s in srcs:
        assert acts[s.name].dims == ("token", f"{s.name}.d") and acts[s.name].dtype == np.float32
        np.testing.assert_array_equal(acts[s.name].values, store.read(s.name, 0, 40))
        mean = xr.open_zarr(path, group=f"stats/{s.name}", consolidated=False)["mean"]
        np.testing.assert_array_equal(mean.values, store.stats(s.name)["mean"])
    tree = xr.open_datatree(path, engine="zarr", consolidated=False)  # the whole store at once
    assert tree["acts"].sizes["token"] == 40


def test_reader_accepts_a_store_without_dimension_names(tmp_path):
    """Stores written before the arrays had dimension names still read as they did."""
    srcs = sources()
    data = write(tmp_path / "s.zarr", 40, srcs)
    for path in (tmp_path / "s.zarr").rglob("zarr.json"):
        meta = json.loads(path.read_text())
        if meta.get("node_type") == "array":
            meta.pop("dimension_names")
            path.write_text(json.dumps(meta))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group[f"acts/{srcs[0].name}"].metadata.dimension_names is None
    store = st.open_store(tmp_path / "s.zarr")
    for s in srcs:
        np.testing.assert_array_equal(store.read(s.name, 0, 40), data[s.name])
        np.testing.assert_allclose(store.stats(s.name)["mean"], data[s.name].astype(np.float64).mean(0), rtol=1e-12)
    assert store.token_arrays()["tokens"].tolist() == list(range(40))


# -- damaged stores: opening checks the store against its attributes (xc-store(5)) ------------------

def _xc(args):
    from click.testing import CliRunner

    from xcli.cli.main import cli
    return CliRunner().invoke(cli, args)


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """A synthetic store (4 chunks, no codec) and a checkpoint trained on it."""
    root = tmp_path_factory.mktemp("damage")
    store, ckpt = root / "s.zarr", root / "x.safetensors"
    assert _xc(["synth", "diff", "--tokens", "1024", "--chunk-rows", "256", "-o", str(store)]).exit_code == 0
    result = _xc(["train", str(store), "-o", str(ckpt), "--latents", "16", "--k", "2", "--batch-size", "64",
                  "--steps", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return store, ckpt


def _attrs(path, change):
    group = zarr.open_group(str(path), mode="r+")
    meta = dict(group.attrs["xc"])
    change(meta)
    group.attrs["xc"] = meta


def _replace_array(path, dtype=None, rows=None):
    group = zarr.open_group(str(path), mode="r+")
    name = f"acts/{group.attrs['xc']['sources'][0]['name']}"
    old = group[name]
    shape = (rows if rows is not None else old.shape[0], old.shape[1])
    del group[name]
    group.create_array(name, data=np.ones(shape, dtype=dtype or old.dtype), chunks=old.chunks)


def _chunk_file(path, index=1):
    group = zarr.open_group(str(path), mode="r")
    name = group.attrs["xc"]["sources"][0]["name"]
    return path / "acts" / name / "c" / str(index) / "0"


DAMAGE = {
    "missing chunk": (lambda p: _chunk_file(p).unlink(), r"chunk file\(s\) of array .* are missing"),
    "truncated chunk": (lambda p: os.truncate(_chunk_file(p), 100), "wrong size"),
    "n_tokens beyond the rows": (lambda p: _attrs(p, lambda m: m.update(n_tokens=m["n_tokens"] + 1)), "shape"),
    "negative n_tokens": (lambda p: _attrs(p, lambda m: m.update(n_tokens=-5)), "n_tokens"),
    "n_tokens not a number": (lambda p: _attrs(p, lambda m: m.update(n_tokens="1024")), "n_tokens"),
    "wrong shape": (lambda p: _replace_array(p, rows=100), "shape"),
    "wrong dtype": (lambda p: _replace_array(p, dtype="float64"), "float64"),
    "no sources": (lambda p: _attrs(p, lambda m: m.pop("sources")), "sources"),
    "no format": (lambda p: _attrs(p, lambda m: m.pop("format")), "format"),
    "unknown dtype": (lambda p: _attrs(p, lambda m: m.update(dtype="int8")), "dtype"),
    "bad source name": (lambda p: _attrs(p, lambda m: m["sources"][0].update(name="../x")), "not valid"),
    "short tokens": (lambda p: _replace_token_array(p), "'tokens'"),
}


def _replace_token_array(path):
    group = zarr.open_group(str(path), mode="r+")
    del group["tokens"]
    group.create_array("tokens", data=np.zeros(10, dtype=np.int32))


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_store_is_one_line_exit_2_for_info_train_and_classify(tmp_path, good_store, damage):
    import shutil
    store = tmp_path / "s.zarr"
    shutil.copytree(good_store[0], store)
    do, message = DAMAGE[damage]
    do(store)
    with pytest.raises(BadInput, match=message):
        st.open_store(store)
    (tmp_path / "out").mkdir()
    for args in (["info", str(store)],
                 ["train", str(store), "-o", str(tmp_path / "out" / "x.safetensors"), "--latents", "16", "--k", "2",
                  "--batch-size", "64", "--steps", "2", "--device", "cpu"],
                 ["classify", str(good_store[1]), "--store", str(store), "--device", "cpu"]):
        result = _xc(args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (args[0], result.output)
        assert len(lines) == 1 and str(store) in lines[0] and "Traceback" not in result.stderr, (args[0], lines)
    assert list((tmp_path / "out").iterdir()) == []  # train wrote nothing


@pytest.mark.parametrize("codec", ["zstd", "blosc-lz4"])
def test_a_corrupt_compressed_chunk_is_found_where_it_is_read(tmp_path, codec):
    srcs, path = sources(), tmp_path / "s.zarr"
    write(path, 40, srcs, codec=codec)
    chunk = path / "acts" / srcs[0].name / "c" / "1" / "0"
    os.truncate(chunk, 7)
    store = st.open_store(path)  # sizes of compressed chunks vary: only reading finds it
    np.testing.assert_array_equal(store.read(srcs[0].name, 0, 16).shape, (16, srcs[0].d))
    with pytest.raises(BadInput, match=rf"damaged: chunk 'c/1/0' of array 'acts/{srcs[0].name}' cannot be read"):
        store.read(srcs[0].name, 0, 40)
    (tmp_path / "out").mkdir()
    result = _xc(["train", str(path), "-o", str(tmp_path / "out" / "x.safetensors"), "--latents", "16", "--k", "2",
                  "--batch-size", "8", "--steps", "2", "--device", "cpu", "--eval-fraction", "0"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert "cannot be read" in result.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_writers_store_chunks_of_zeros_so_a_store_of_zeros_opens(tmp_path):
    srcs, path = sources(), tmp_path / "s.zarr"
    w = st.StoreWriter(path, srcs, dtype="float32", chunk_rows=16)
    w.append({s.name: np.zeros((40, s.d), np.float32) for s in srcs})
    w.close()
    store = st.open_store(path)
    assert np.all(store.read(srcs[0].name, 0, 40) == 0)


def test_a_foreign_store_without_attributes_still_opens_but_is_checked(tmp_path):
    g = zarr.open_group(str(tmp_path / "f.zarr"), mode="w")
    g.create_array("acts/a", data=np.ones((30, 4), np.float16), chunks=(8, 4))
    assert st.open_store(tmp_path / "f.zarr").n_tokens == 30
    g.create_array("acts/b", data=np.ones((30, 4), np.int64), chunks=(8, 4))
    with pytest.raises(BadInput, match="acts/b"):
        st.open_store(tmp_path / "f.zarr")
