"""xc export --format saelens, checked with SAELens itself (sae-lens is in the [test] extra: never skipped).

Every slice loads with `SAE.load_from_disk`, encodes and decodes as the crosscoder does on its source,
survives `fold_W_dec_norm()` (which SAEDashboard calls) unchanged, and names its model and run.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import sae_lens
import torch
import zarr
from click.testing import CliRunner
from safetensors.torch import load_file

from test_export import N_LATENTS, sources_for, sparse_crosscoder, write_store
from xcli.cli import cli
from xcli.crosscoder import model as cc
from xcli.data.store import open_store
from xcli.export import ExportConfig, export
from xcli.export.common import crosscoder_id, default_set_name
from xcli.source import Source

ARCHS = [("relu", None), ("batchtopk", 3), ("topk", 3), ("jumprelu", None)]
CLASSES = {"relu": sae_lens.StandardSAE, "batchtopk": sae_lens.JumpReLUSAE, "topk": sae_lens.TopKSAE,
           "jumprelu": sae_lens.JumpReLUSAE}
ROWS = 120


@pytest.fixture(scope="module")
def store_path(tiny, tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("saelens") / "acts.zarr", tiny)


def crosscoder(tiny, store_path, arch, k, write=None) -> cc.Crosscoder:
    """The test_export crosscoder (distinct decoder norms per source) with decoder biases, optionally writing fewer
    sources."""
    model = sparse_crosscoder(sources_for(tiny), open_store(store_path), arch, k)
    if write is not None:  # the same weights, writing only `write`
        narrowed = cc.Crosscoder(model.sources, N_LATENTS, arch, k, model.read, write)
        narrowed.load_state_dict({n: t for n, t in model.state_dict().items()
                                  if not n.startswith(("W_dec.", "b_dec."))}, strict=False)
        with torch.no_grad():
            for name in write:
                narrowed.decoder_weight(name).copy_(model.decoder_weight(name))
        model = narrowed.eval()
    with torch.no_grad():
        for b in model.b_dec:
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


def on_its_own(model: cc.Crosscoder, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The crosscoder's latents and reconstruction of source `name` from that source alone (the others zero)."""
    alone = {s.name: (x if s.name == name else torch.zeros(len(x), s.d)) for s in model.sources}
    with torch.no_grad():
        f = model.encode(alone)
        return f, model.decode(f)[name]


def slice_rule(model: cc.Crosscoder, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented TopK slice: the crosscoder's latents on this source alone, ranked by f_i * r_i (r_i: the
    latent's decoder norm in this source, raw units) instead of f_i * sum_s ||d_i^s||; latents f_i * r_i."""
    alone = {s.name: (x if s.name == name else torch.zeros(len(x), s.d)) for s in model.sources}
    with torch.no_grad():
        f = torch.relu(model.pre_activations(alone))
        r = model.decoder_weight(name).norm(dim=1) / model.scale(name)
        idx = (f * r).topk(model.k, dim=-1).indices
        kept = torch.zeros_like(f).scatter(-1, idx, f.gather(-1, idx))
        return kept * r, model.decode(kept)[name]


def export_slices(model, tmp_path, *args) -> Path:
    ckpt = cc.save(model, tmp_path / "xc.safetensors")
    out = tmp_path / "saes"
    result = CliRunner().invoke(cli, ["export", str(ckpt), "--format", "saelens", "-o", str(out), *args])
    assert result.exit_code == 0, result.stderr
    return out


def rows(store_path, name) -> torch.Tensor:
    return torch.from_numpy(open_store(store_path).read(name, 0, ROWS))


@pytest.mark.parametrize("arch,k", ARCHS)
def test_saelens_loads_every_slice_and_computes_the_crosscoder(tiny, store_path, tmp_path, arch, k):
    model = crosscoder(tiny, store_path, arch, k)
    out = export_slices(model, tmp_path, "--model-id", f"{tiny['gpt2']}=gpt2-small")
    manifest = json.loads((out / "xc-export.json").read_text())
    assert [s["source"] for s in manifest["slices"]] == [s.name for s in model.sources]
    for source in model.sources:
        folder = out / source.name
        sae = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
        assert type(sae) is CLASSES[arch] and sae.cfg.d_in == source.d and sae.cfg.d_sae == N_LATENTS
        w = load_file(str(folder / "sae_weights.safetensors"))
        thresholded = arch in ("batchtopk", "jumprelu")
        assert set(w) == {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if thresholded else set())
        assert w["W_enc"].shape == (source.d, N_LATENTS) and w["W_dec"].shape == (N_LATENTS, source.d)
        x = rows(store_path, source.name)
        f, recon = on_its_own(model, source.name, x) if arch != "topk" else slice_rule(model, source.name, x)
        assert f.count_nonzero() > 0
        with torch.no_grad():
            latents = sae.encode(x)
            torch.testing.assert_close(latents, f, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sae.decode(latents), recon, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-5)
        if arch == "topk":  # the crosscoder's own pick, where the norms agree: most tokens
            exact, _ = on_its_own(model, source.name, x)
            same = ((exact > 0) == (f > 0)).all(dim=1).float().mean()
            assert 0.5 < same < 1  # the fixture's norms differ per source (x0.5 to x2), so some picks differ
            assert json.loads((folder / "xc-slice.json").read_text())["topk_selection"].startswith("by f_i")
    cfg = json.loads((out / "a.resid_post.1" / "cfg.json").read_text())
    ckpt = tmp_path / "xc.safetensors"
    assert cfg["metadata"]["neuronpedia_id"] == \
        f"gpt2-small/1-{default_set_name(N_LATENTS, crosscoder_id(ckpt))}"
    assert cfg["metadata"]["hook_name"] == "blocks.1.hook_resid_post"


@pytest.mark.parametrize("write", [["a.resid_post.1"], ["b.resid_post.1"]])
def test_a_topk_slice_picks_the_crosscoders_latents_when_it_writes_one_source(tiny, store_path, tmp_path, write):
    """One written source: sum_s ||d_i^s|| is that source's norm, so SAELens's folded TopK is exactly ours."""
    model = crosscoder(tiny, store_path, "topk", 3, write=write)
    out = export_slices(model, tmp_path)
    (name,) = write
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [name]  # the read-only source gets no slice
    sae = sae_lens.SAE.load_from_disk(str(out / name), device="cpu")
    x = rows(store_path, name)
    f, recon = on_its_own(model, name, x)
    r = (model.decoder_weight(name).norm(dim=1) / model.scale(name)).detach()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), f * r, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-5)
    assert json.loads((out / name / "xc-slice.json").read_text())["topk_selection"] == "the crosscoder's"


@pytest.mark.parametrize("arch,k", ARCHS)
def test_fold_W_dec_norm_runs_on_every_slice_and_changes_nothing(tiny, store_path, tmp_path, arch, k):
    """SAEDashboard calls fold_W_dec_norm() on the SAE it loads; SAELens's TopK refuses it unless
    rescale_acts_by_decoder_norm, and our TopK slices come folded already. Folding keeps the reconstruction and
    which latents fire; a latent's value becomes value * ||W_dec,i|| (1 for TopK slices)."""
    model = crosscoder(tiny, store_path, arch, k)
    with torch.no_grad():  # latent DEAD writes nothing to source a: its slice must still fold and decode (no NaN)
        model.decoder_weight("a.resid_post.1")[7] = 0
    out = export_slices(model, tmp_path)
    for source in model.sources:
        x = rows(store_path, source.name)
        sae = sae_lens.SAE.load_from_disk(str(out / source.name), device="cpu")
        with torch.no_grad():
            before, recon = sae.encode(x), sae(x)
            W_dec = sae.W_dec.clone()
            sae.fold_W_dec_norm()
            torch.testing.assert_close(sae.encode(x), before * W_dec.norm(dim=1).clamp(min=1e-8), rtol=1e-4,
                                       atol=1e-5)
            torch.testing.assert_close(sae(x), recon, rtol=1e-4, atol=1e-5)
            assert torch.isfinite(sae(x)).all()
            folded = sae_lens.SAE.load_from_disk(str(out / source.name), device="cpu", fold_W_dec_norm=True)
            torch.testing.assert_close(folded(x), recon, rtol=1e-4, atol=1e-5)
        if arch == "topk":  # already folded: unit decoder rows, which the fold leaves as they are
            torch.testing.assert_close(W_dec.norm(dim=1), torch.ones(N_LATENTS))
            torch.testing.assert_close(sae.W_dec, W_dec)


def harvested_store(store_path: Path, tmp_path: Path, models: list[dict], **meta) -> Path:
    """A copy of the store with the attributes xc harvest records (aliases base and chat)."""
    import shutil

    copy = shutil.copytree(store_path, tmp_path / "harvested.zarr")
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["xc"] = {**dict(group.attrs["xc"]), "harvest": {"models": models}, **meta}
    return copy


def aliased(tiny, store) -> cc.Crosscoder:
    sources = [Source(s.name, alias, s.site, s.layer, s.d) for s, alias in zip(sources_for(tiny), ("base", "chat"))]
    return sparse_crosscoder(sources, open_store(store))


def test_metadata_names_the_harvested_model_and_how_it_was_run(tiny, store_path, tmp_path):
    """model_name is what TransformerLens loads: the hub id harvested, not the alias; prepend_bos, special tokens,
    context and dataset come from the harvest's record of the training store the checkpoint names."""
    store = harvested_store(store_path, tmp_path, [
        {"alias": "base", "id": "openai-community/gpt2", "revision": "abc123"},
        {"alias": "chat", "id": str(tiny["gpt2_b"]), "revision": None}],
        packing={"prefix": [0], "suffix": [], "separator": [0], "context_length": 64},
        special_tokens_stored=False, context_length=64, dataset="someone/corpus")
    model = aliased(tiny, store)
    ckpt = cc.save(model, tmp_path / "xc.safetensors", extra={"store": [
        {"path": str(store.resolve()), "context_length": 64, "tokenizer": "openai-community/gpt2"}]})
    export(ExportConfig(ckpt, tmp_path / "saes", format="saelens"))  # no --store: the checkpoint's store
    base = sae_lens.SAE.load_from_disk(str(tmp_path / "saes" / "a.resid_post.1"), device="cpu").cfg.metadata
    chat = sae_lens.SAE.load_from_disk(str(tmp_path / "saes" / "b.resid_post.1"), device="cpu").cfg.metadata
    assert base.model_name == "openai-community/gpt2"
    assert chat.model_name == Path(tiny["gpt2_b"]).name  # a local folder: its name
    for m in (base, chat):
        assert m.prepend_bos is True and m.exclude_special_tokens is True and m.context_size == 64
        assert m.dataset_path == "someone/corpus" and m.hook_name == "blocks.1.hook_resid_post"
    facts = json.loads((tmp_path / "saes" / "a.resid_post.1" / "xc-slice.json").read_text())
    assert facts["model"] == {"name": "openai-community/gpt2", "from": "harvest record (hub id)",
                              "harvested": "openai-community/gpt2", "revision": "abc123"}
    assert facts["harvest"]["store"] == str(store.resolve()) and facts["harvest"]["special_tokens_stored"] is False
    # --model-id names a model whose harvest record is a folder (not something TransformerLens can load by name).
    export(ExportConfig(ckpt, tmp_path / "named", format="saelens", model_ids=("chat=gpt2-chat",)))
    cfg = json.loads((tmp_path / "named" / "b.resid_post.1" / "cfg.json").read_text())
    assert cfg["metadata"]["model_name"] == "gpt2-chat"


def test_prepend_bos_follows_the_harvest_and_is_assumed_without_a_record(tiny, store_path, tmp_path):
    store = harvested_store(store_path, tmp_path, [{"alias": "base", "id": "gpt2", "revision": None},
                                                   {"alias": "chat", "id": "gpt2", "revision": None}],
                            packing={"prefix": [], "suffix": [], "separator": [0], "context_length": 64},
                            special_tokens_stored=True)
    ckpt = cc.save(aliased(tiny, store), tmp_path / "xc.safetensors")
    export(ExportConfig(ckpt, tmp_path / "saes", format="saelens", store=store))  # --store: its record
    cfg = json.loads((tmp_path / "saes" / "a.resid_post.1" / "cfg.json").read_text())["metadata"]
    assert cfg["prepend_bos"] is False and cfg["exclude_special_tokens"] is False and cfg["model_name"] == "gpt2"
    export(ExportConfig(ckpt, tmp_path / "bare", format="saelens"))  # no store anywhere: the alias, and defaults
    cfg = json.loads((tmp_path / "bare" / "a.resid_post.1" / "cfg.json").read_text())["metadata"]
    assert cfg["model_name"] == "base" and cfg["prepend_bos"] is True and "exclude_special_tokens" not in cfg
    facts = json.loads((tmp_path / "bare" / "a.resid_post.1" / "xc-slice.json").read_text())
    assert facts["harvest"]["store"] is None and "assumed" in facts["harvest"]["prepend_bos"]
    sae_lens.SAE.load_from_disk(str(tmp_path / "bare" / "a.resid_post.1"), device="cpu")


def activity_kept(model: cc.Crosscoder, x: dict[str, torch.Tensor], folder: Path, name: str) -> float:
    """Of the crosscoder's active (token, latent) pairs on all its sources, the share that the SAELens slice of
    source `name` also fires, from that source alone."""
    sae = sae_lens.SAE.load_from_disk(str(folder / name), device="cpu")
    with torch.no_grad():
        full = model.encode(x) > 0
        sliced = sae.encode(x[name]) > 0
    return float((full & sliced).sum() / full.sum())


@pytest.mark.parametrize("arch,k", ARCHS)
def test_a_slice_fires_part_of_the_crosscoders_activity(tiny, store_path, tmp_path, arch, k):
    """The measure docs/commands/xc-export.md reports (there on trained crosscoders; here the random fixture)."""
    model = crosscoder(tiny, store_path, arch, k)
    out = export_slices(model, tmp_path)
    store = open_store(store_path)
    x = {n: torch.from_numpy(store.read(n, 0, store.n_tokens)) for n in store.names}
    kept = [activity_kept(model, x, out, s.name) for s in model.sources]
    assert all(0 < share < 1 for share in kept), kept
    assert np.isfinite(kept).all()
