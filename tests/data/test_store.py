import json

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
