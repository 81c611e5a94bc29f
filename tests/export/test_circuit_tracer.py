"""xc export --format circuit-tracer: per-layer xc transcoders as circuit-tracer's transcoder set.

circuit-tracer 0.5.0 pins transformers<=4.57.3 (xc's environment has 5.x), so CI checks its documented
layout and formulas (circuit_tracer/transcoder/single_layer_transcoder.py: load_relu_transcoder,
SingleLayerTranscoder.encode/decode, JumpReLU) written out here; where circuit-tracer is importable, the
last test loads the export with circuit-tracer itself."""

import json

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from xcli.cli import cli
from xcli.crosscoder.model import Crosscoder, load, save
from xcli.errors import BadInput
from xcli.export import ExportConfig, export
from xcli.source import Source

D, F, N_LAYERS = 8, 24, 3


def transcoder(tmp_path, layer, arch="batchtopk", seed=0, d_out=D, read_site="blocks.{layer}.ln2.hook_normalized",
               write_site="mlp_out", read_layer=None):
    s_in = Source(f"gpt2.ln2.{layer}", "gpt2", read_site, layer if read_layer is None else read_layer, D)
    s_out = Source(f"gpt2.mlp_out.{layer}", "gpt2", write_site, layer, d_out)
    model = Crosscoder([s_in, s_out], F, arch, k=4 if arch not in ("relu", "jumprelu") else None, read=[s_in.name],
                       write=[s_out.name])
    g = torch.Generator().manual_seed(seed + layer)
    model.init_weights(g)
    with torch.no_grad():
        model.b_enc.copy_(torch.randn(F, generator=g) * 0.05)
        model.b_dec[0].copy_(torch.randn(d_out, generator=g))
        model.input_scale.copy_(torch.tensor([0.5, 2.0]))
        model.threshold.fill_(0.03)
        if arch == "jumprelu":
            model.set_thresholds(torch.linspace(0.0, 0.5, F))
        model.decoder_weight(s_out.name)[3].zero_()  # a latent that writes nothing
    return save(model.eval(), tmp_path / f"tc{layer}.safetensors")


def exported(tmp_path, arch="batchtopk", **options):
    paths = [transcoder(tmp_path, layer, arch) for layer in range(N_LAYERS)]
    out = export(ExportConfig(checkpoint=paths[0], transcoders=tuple(paths[1:]), output=tmp_path / "ct",
                              format="circuit-tracer", **options))
    return paths, out


def their_layer(path):
    """circuit-tracer's per-layer transcoder from its documented layout: encode F.linear(x, W_enc, b_enc) then
    ReLU, or JumpReLU x * (x > threshold) when activation_function.threshold is present; decode acts @ W_dec + b_dec."""
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def encode(x):
        pre = torch.nn.functional.linear(x, t["W_enc"], t["b_enc"])
        if "activation_function.threshold" in t:
            return pre * (pre > t["activation_function.threshold"])
        return torch.relu(pre)

    return t, encode, lambda acts: acts @ t["W_dec"] + t["b_dec"]


@pytest.mark.parametrize("arch", ["batchtopk", "relu", "jumprelu"])
def test_layout_and_each_layer_computes_as_the_xc_transcoder(tmp_path, arch):
    paths, out = exported(tmp_path, arch)
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", *(f"layer_{i}.safetensors" for i in
                                                                      range(N_LAYERS)), "xc-export.json"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set" and cfg["model_name"] == "gpt2"
    assert cfg["feature_input_hook"] == "ln2.hook_normalized" and cfg["feature_output_hook"] == "hook_mlp_out"
    assert isinstance(cfg["scan"], str) and "transcoders" not in cfg  # the layer_*.safetensors files are found
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(9)) * 2
    for layer, path in enumerate(paths):
        t, encode, decode = their_layer(out / f"layer_{layer}.safetensors")
        assert t["W_enc"].shape == (F, D) and t["W_dec"].shape == (F, D) and t["b_dec"].shape == (D,)
        assert ("activation_function.threshold" in t) == (arch in ("batchtopk", "jumprelu"))
        model = load(path)
        with torch.no_grad():
            f = model.encode({model.read[0]: x})
            x_hat = model.decode(f)[model.write[0]]
        acts = encode(x)
        if arch == "batchtopk":
            assert 0 < int((acts > 0).sum()) < int((torch.relu(x @ t["W_enc"].T + t["b_enc"]) > 0).sum())
            assert t["activation_function.threshold"][3] > 1e30
        if arch == "jumprelu":
            torch.testing.assert_close(t["activation_function.threshold"], torch.linspace(0.0, 0.5, F))
            assert 0 < int((acts > 0).sum()) < int((torch.relu(x @ t["W_enc"].T + t["b_enc"]) > 0).sum())
        torch.testing.assert_close(acts, f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decode(acts), x_hat, rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "xc-export.json").read_text())
    assert manifest["kind"] == "circuit-tracer" and [x["layer"] for x in manifest["layers"]] == [0, 1, 2]


def test_cli_with_model_id_and_set_name(tmp_path):
    paths = [transcoder(tmp_path, layer, "relu") for layer in range(2)]
    args = ["export", str(paths[1]), "--transcoder", str(paths[0]), "--format", "circuit-tracer", "-o",
            str(tmp_path / "ct"), "--model-id", "openai-community/gpt2", "--set-name", "xc-tc"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(tmp_path / "ct")
    cfg = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert cfg["model_name"] == "openai-community/gpt2" and cfg["scan"] == "xc-tc"


@pytest.mark.parametrize("layers, kwargs, message", [
    ((0, 2), {}, "no transcoder for layer 1"),
    ((0, 0), {}, "both transcoders of layer 0"),
    ((0,), {"arch": "topk"}, "TopK transcoder"),
    ((0,), {"write_site": "model.layers.{layer}.mlp"}, "no known TransformerLens hook"),
    ((0,), {"d_out": D + 1}, "differs from output width"),
    ((1,), {"read_layer": 0, "read_site": "resid_pre"}, "reads resid_pre of layer 0 and writes mlp_out of layer 1"),
])
def test_what_circuit_tracer_cannot_load_is_refused(tmp_path, layers, kwargs, message):
    paths = []
    for i, layer in enumerate(layers):
        (tmp_path / str(i)).mkdir()
        paths.append(transcoder(tmp_path / str(i), layer, **kwargs))
    if layers == (1,):
        paths.insert(0, transcoder(tmp_path, 0))
    with pytest.raises(BadInput, match=message):
        export(ExportConfig(checkpoint=paths[0], transcoders=tuple(paths[1:]), output=tmp_path / "ct",
                            format="circuit-tracer"))
    assert not (tmp_path / "ct").exists()


def test_resid_post_of_the_layer_below_reads_as_hook_resid_pre_and_hooks_override(tmp_path):
    path = transcoder(tmp_path, 1, read_site="resid_post", read_layer=0)
    zero = transcoder(tmp_path, 0, read_site="resid_pre")
    export(ExportConfig(checkpoint=zero, transcoders=(path,), output=tmp_path / "ct", format="circuit-tracer"))
    assert yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())["feature_input_hook"] == "hook_resid_pre"
    export(ExportConfig(checkpoint=zero, transcoders=(path,), output=tmp_path / "ct2", format="circuit-tracer",
                        hooks=("hook_resid_mid", "hook_mlp_out")))
    assert yaml.safe_load((tmp_path / "ct2" / "config.yaml").read_text())["feature_input_hook"] == "hook_resid_mid"
    # layer n to layer n+1 as resid_pre -> resid_pre: block n's input and output
    (tmp_path / "b").mkdir()
    one = transcoder(tmp_path / "b", 1, read_site="resid_pre", write_site="resid_pre", read_layer=0)
    export(ExportConfig(checkpoint=one, output=tmp_path / "ct3", format="circuit-tracer"))
    cfg = yaml.safe_load((tmp_path / "ct3" / "config.yaml").read_text())
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == ("hook_resid_pre", "hook_resid_post")
    assert [p.name for p in sorted((tmp_path / "ct3").glob("layer_*"))] == ["layer_0.safetensors"]
    with pytest.raises(BadInput, match="apply to --format circuit-tracer"):
        ExportConfig(checkpoint=zero, transcoders=(path,), output=tmp_path / "x", format="saelens")


def test_circuit_tracer_itself_loads_the_set(tmp_path):
    """What circuit-tracer's load_transcoders_from_cache does with a folder: config.yaml, then
    load_transcoder_set over the layer_<L>.safetensors files (its hub helpers need huggingface_hub < 1)."""
    single = pytest.importorskip("circuit_tracer.transcoder.single_layer_transcoder", exc_type=ImportError)
    paths, out = exported(tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    layer_files = {int(f.stem.split("_")[1]): str(f) for f in sorted(out.glob("layer_*.safetensors"))}
    tset = single.load_transcoder_set(layer_files, scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
                                      feature_output_hook=cfg["feature_output_hook"], device=torch.device("cpu"))
    assert isinstance(tset, single.TranscoderSet) and len(tset) == N_LAYERS
    assert tset.feature_input_hook == "ln2.hook_normalized" and tset.feature_output_hook == "hook_mlp_out"
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(2))
    for layer, path in enumerate(paths):
        model = load(path)
        with torch.no_grad():
            f = model.encode({model.read[0]: x})
            torch.testing.assert_close(tset[layer].encode(x), f, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(tset[layer].decode(f), model.decode(f)[model.write[0]], rtol=1e-5, atol=1e-5)
