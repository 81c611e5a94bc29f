"""xc import of SAELens SAEs and transcoders: fixtures written by SAELens's own save_model, encode and decode
checked against SAELens's documented formulas (and against SAELens itself), refusals, and a round trip
through xc's own SAELens export."""

import json

import pytest
import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
from sae_lens.saes.sae import SAEMetadata
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

from xcli.crosscoder.model import Crosscoder, load, read_metadata, save
from xcli.errors import BadInput
from xcli.export import ExportConfig, export
from xcli.imports import ImportConfig, detect, import_dictionary
from xcli.source import Source

D, F = 8, 32


def meta(**extra):
    return SAEMetadata(model_name="gpt2", hook_name="blocks.6.hook_resid_pre", **extra)


def randomise(sae, seed=0, unit_rows=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b_") else 1.0))
        if unit_rows:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def written(sae, tmp_path, name="sae"):
    sae.save_model(tmp_path / name)
    return tmp_path / name


def imported(folder, tmp_path, **options):
    return load(import_dictionary(ImportConfig(folder, tmp_path / "xc.safetensors", **options)))


def run(model, x):
    with torch.no_grad():
        f = model.encode({model.read[0]: x})
        return f, model.decode(f)[model.write[0]]


def x_in(n=64, d=D, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2


def test_standard_sae_with_b_dec_applied_to_input(tmp_path):
    sae = randomise(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=True, metadata=meta())))
    folder = written(sae, tmp_path)
    assert detect(folder) == "saelens"
    model = imported(folder, tmp_path)
    x = x_in()
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    f_ref = torch.relu((x - b_dec) @ W_enc + b_enc)  # SAELens: f = ReLU((x - b_dec) W_enc + b_enc)
    f, x_hat = run(model, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, f_ref @ W_dec + b_dec, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-5, atol=1e-5)  # and SAELens itself agrees
    m = read_metadata(tmp_path / "xc.safetensors")
    assert m["arch"] == "relu" and m["sources"] == [{"name": "gpt2.resid_pre.6", "model": "gpt2", "site": "resid_pre",
                                                     "layer": 6, "d": D, "revision": None}]
    assert m["imported"]["format"] == "saelens" and m["imported"]["apply_b_dec_to_input"].startswith("folded")


@pytest.mark.parametrize("rescale", [True, False])
def test_topk_sae(tmp_path, rescale):
    sae = randomise(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=4, rescale_acts_by_decoder_norm=rescale,
                                          apply_b_dec_to_input=False, metadata=meta())), unit_rows=not rescale)
    model = imported(written(sae, tmp_path), tmp_path)
    assert model.arch == "topk" and model.k == 4
    x = x_in()
    W_enc, b_enc, W_dec, b_dec = (getattr(sae, n).detach() for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    norms = W_dec.norm(dim=1)
    pre = x @ W_enc + b_enc
    if rescale:
        pre = pre * norms
    top = pre.topk(4, dim=1)
    f_ref = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())  # ReLU of the k largest
    x_ref = (f_ref / norms if rescale else f_ref) @ W_dec + b_dec
    f, x_hat = run(model, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-5, atol=1e-5)


def test_topk_without_rescale_and_unequal_norms_is_refused(tmp_path):
    sae = randomise(TopKSAE(TopKSAEConfig(d_in=D, d_sae=F, k=4, metadata=meta())))
    with pytest.raises(BadInput, match="picks would differ"):
        imported(written(sae, tmp_path), tmp_path)


def jumprelu(thresholds_from, tmp_path):
    sae = randomise(JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F, apply_b_dec_to_input=False, metadata=meta())))
    with torch.no_grad():
        sae.threshold.copy_(thresholds_from(sae.W_dec.norm(dim=1)))
    return sae, written(sae, tmp_path)


def test_jumprelu_with_one_batchtopk_threshold_becomes_batchtopk(tmp_path):
    theta = 0.7
    sae, folder = jumprelu(lambda norms: theta / norms, tmp_path)  # as SAELens saves a rescaled BatchTopK
    assert imported(folder, tmp_path).arch == "jumprelu"  # without k: its thresholds kept per latent
    model = imported(folder, tmp_path, k=4, overwrite=True)
    assert model.arch == "batchtopk" and float(model.threshold) == pytest.approx(theta, rel=1e-6)
    x = x_in()
    pre = x @ sae.W_enc.detach() + sae.b_enc.detach()
    f_ref = torch.relu(pre) * (pre > sae.threshold.detach())  # SAELens JumpReLU
    f, x_hat = run(model, x)
    assert 0 < int((f_ref > 0).sum()) < int((pre > 0).sum())
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-5, atol=1e-5)


def test_jumprelu_with_per_latent_thresholds_becomes_jumprelu(tmp_path):
    """Per-latent thresholds, some below 0 (SAELens fires those at p > 0: xc's threshold 0)."""
    thresholds = torch.rand(F, generator=torch.Generator().manual_seed(3)) * 0.8 - 0.1
    sae, folder = jumprelu(lambda norms: thresholds, tmp_path)
    with pytest.raises(BadInput, match="differ per latent"):
        imported(folder, tmp_path, k=4)
    assert not (tmp_path / "xc.safetensors").exists()
    model = imported(folder, tmp_path)
    assert model.arch == "jumprelu" and bool((thresholds < 0).any())
    x = x_in()
    pre = x @ sae.W_enc.detach() + sae.b_enc.detach()
    f_ref = torch.relu(pre) * (pre > thresholds)  # SAELens JumpReLU
    assert 0 < int((f_ref > 0).sum()) < int((pre > 0).sum())
    f, x_hat = run(model, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(x_hat, sae(x), rtol=1e-5, atol=1e-5)


def test_transcoder_reads_one_site_and_writes_another(tmp_path):
    cfg = TranscoderConfig(d_in=D, d_sae=F, d_out=D + 4, apply_b_dec_to_input=False,
                           metadata=meta(hook_name_out="blocks.6.hook_mlp_out"))
    cfg.metadata.hook_name = "blocks.6.ln2.hook_normalized"
    sae = randomise(Transcoder(cfg))
    model = imported(written(sae, tmp_path), tmp_path)
    assert model.read == ["gpt2.ln2.hook_normalized.6"] and model.write == ["gpt2.mlp_out.6"]
    sources = {s.name: s for s in model.sources}
    assert sources["gpt2.ln2.hook_normalized.6"].site == "blocks.{layer}.ln2.hook_normalized"
    assert sources["gpt2.mlp_out.6"].d == D + 4
    x = x_in()
    f, x_hat = run(model, x)
    f_ref = torch.relu(x @ sae.W_enc.detach() + sae.b_enc.detach())
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, f_ref @ sae.W_dec.detach() + sae.b_dec.detach(), rtol=1e-5, atol=1e-5)


def test_sources_override_and_runtime_normalisation_refused(tmp_path):
    sae = randomise(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, metadata=meta())))
    model = imported(written(sae, tmp_path), tmp_path, sources=("a=a:synthetic",))
    assert [s.name for s in model.sources] == ["a"]
    sae.cfg.normalize_activations = "layer_norm"
    with pytest.raises(BadInput, match="rescales each token"):
        import_dictionary(ImportConfig(written(sae, tmp_path, "ln"), tmp_path / "ln.safetensors"))


def test_round_trip_through_xc_export_saelens(tmp_path):
    """xc's SAELens export of a BatchTopK crosscoder imports back to the same encoder and decoder."""
    src = [Source("gpt2.resid_post.3", "gpt2", "resid_post", 3, D)]
    model = Crosscoder(src, F, "batchtopk", k=4)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_enc.normal_(0, 0.05)
        model.threshold.fill_(0.02)
        model.input_scale.fill_(0.5)
    save(model.eval(), tmp_path / "orig.safetensors")
    export(ExportConfig(checkpoint=tmp_path / "orig.safetensors", output=tmp_path / "saes", format="saelens"))
    folder = tmp_path / "saes" / "gpt2.resid_post.3"
    assert json.loads((folder / "cfg.json").read_text())["architecture"] == "jumprelu"
    back = imported(folder, tmp_path, k=4)
    x = x_in() * 3
    f0, x0 = run(load(tmp_path / "orig.safetensors"), x)
    f1, x1 = run(back, x)
    assert back.arch == "batchtopk" and int((f0 > 0).sum()) > 0
    torch.testing.assert_close(f1, f0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1, x0, rtol=1e-5, atol=1e-5)
    assert SAE.load_from_disk(folder) is not None


def test_training_checkpoint_scaling_factor_becomes_the_input_scale(tmp_path):
    """expected_average_only_in with activation_scaler.json (a checkpoint saved during training): SAELens's
    trainer feeds x * s and reads the output / s; a final SAE has s folded in instead (fold_activation_norm_...)."""
    s = 0.25
    sae = randomise(StandardSAE(StandardSAEConfig(d_in=D, d_sae=F, normalize_activations="expected_average_only_in",
                                                  metadata=meta())))
    folder = written(sae, tmp_path)
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s}))
    model = imported(folder, tmp_path)
    x = x_in()
    with torch.no_grad():
        x_ref = sae(x * s) / s
        sae.fold_activation_norm_scaling_factor(s)  # SAELens's own fold gives the same SAE in raw units
        torch.testing.assert_close(sae(x), x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(run(model, x)[1], x_ref, rtol=1e-5, atol=1e-5)
    assert float(model.scale(model.read[0])) == s
