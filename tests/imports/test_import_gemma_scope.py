"""xc import of Gemma Scope (params.npz) and Gemma Scope 2 (params.safetensors + config.json) JumpReLU SAEs and
transcoders: fixtures in the layout SAELens's loaders read (sae_lens/loading/pretrained_sae_loaders.py), encode
and decode checked against the JumpReLU forward of the Gemma Scope tutorial written out here, and refusals."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from xcli.cli import cli
from xcli.crosscoder.model import load, read_metadata
from xcli.errors import BadInput
from xcli.imports import ImportConfig, detect, import_dictionary

D, F = 8, 32


def their_params(d_in=D, d_out=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w_enc": torch.randn(d_in, F, generator=g) / d_in ** 0.5, "w_dec": torch.randn(F, d_out, generator=g),
            "b_enc": torch.randn(F, generator=g) * 0.1, "b_dec": torch.randn(d_out, generator=g),
            "threshold": torch.rand(F, generator=g) * 0.7 - 0.1}  # a few below 0: they fire at p > 0


def their_forward(params, x):
    """JumpReLUSAE of the Gemma Scope tutorial: p = x W_enc + b_enc, f = ReLU(p) * (p > threshold), f W_dec + b_dec."""
    p = x @ params["w_enc"] + params["b_enc"]
    f = torch.relu(p) * (p > params["threshold"])
    return f, f @ params["w_dec"] + params["b_dec"]


def gemma_scope_2(folder, params, **config):
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in params.items()}, str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "jump_relu", **config}))
    return folder


def gemma_scope_1(folder, params):
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in params.items()})
    return folder


def ours(path, x):
    model = load(path)
    with torch.no_grad():
        f = model.encode({model.read[0]: x})
        return f, model.decode(f)[model.write[0]]


def check_against_theirs(out, params, d_in=D):
    x = torch.randn(64, d_in, generator=torch.Generator().manual_seed(1)) * 2
    f_ref, x_ref = their_forward(params, x)
    relu_only = torch.relu(x @ params["w_enc"] + params["b_enc"])
    assert 0 < int((f_ref > 0).sum()) < int((relu_only > 0).sum())  # the thresholds cut latents
    f, x_hat = ours(out, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)


def test_gemma_scope_2_sae_with_its_config(tmp_path):
    params = their_params()
    folder = gemma_scope_2(tmp_path / "resid_post" / "layer_13_width_16k_l0_medium", params,
                           model_name="gemma-v3-1b-pt", hf_hook_point_in="model.layers.13.output")
    assert detect(folder) == "gemma-scope"
    out = import_dictionary(ImportConfig(folder, tmp_path / "xc.safetensors"))
    check_against_theirs(out, params)
    meta = read_metadata(out)
    assert meta["arch"] == "jumprelu" and meta["imported"]["thresholds_below_zero"] > 0
    assert meta["sources"] == [{"name": "gemma-3-1b-pt.resid_post.13", "model": "google/gemma-3-1b-pt",
                                "site": "resid_post", "layer": 13, "d": D, "revision": None}]
    assert meta["imported"]["format"] == "gemma_scope" and meta["imported"]["kind"] == "SAE"


def test_gemma_scope_2_transcoder_reads_its_input_and_writes_its_output(tmp_path):
    params = their_params(d_in=D, d_out=D + 2)
    folder = gemma_scope_2(tmp_path / "transcoder" / "layer_7", params, model_name="gemma-v3-270m-pt",
                           hf_hook_point_in="model.layers.7.pre_feedforward_layernorm.output",
                           hf_hook_point_out="model.layers.7.post_feedforward_layernorm.output",
                           affine_connection=False)
    out = import_dictionary(ImportConfig(folder / "params.safetensors", tmp_path / "xc.safetensors"))
    check_against_theirs(out, params)
    meta = read_metadata(out)
    assert [(s["model"], s["site"], s["layer"], s["d"]) for s in meta["sources"]] == [
        ("google/gemma-3-270m", "model.layers.{layer}.pre_feedforward_layernorm", 7, D),
        ("google/gemma-3-270m", "mlp_out", 7, D + 2)]
    assert meta["read"] == [meta["sources"][0]["name"]] and meta["write"] == [meta["sources"][1]["name"]]


@pytest.mark.parametrize("n_sources", [1, 2])
def test_gemma_scope_1_npz_with_sources_from_the_command_line(tmp_path, n_sources):
    """params.npz records nothing: one --source makes it an SAE, two a transcoder (input, then output)."""
    params = their_params()
    folder = gemma_scope_1(tmp_path / "layer_12" / "width_16k" / "average_l0_82", params)
    specs = ("google/gemma-2-2b:resid_post:12",) if n_sources == 1 else \
        ("in=google/gemma-2-2b:model.layers.{layer}.pre_feedforward_layernorm:12", "out=google/gemma-2-2b:mlp_out:12")
    assert detect(folder / "params.npz") == "gemma-scope"
    out = import_dictionary(ImportConfig(folder, tmp_path / "xc.safetensors", sources=specs))
    check_against_theirs(out, params)
    assert len(read_metadata(out)["sources"]) == n_sources
    with pytest.raises(BadInput, match="no --source given"):
        import_dictionary(ImportConfig(folder, tmp_path / "again.safetensors"))


REFUSALS = [
    (lambda p, c: c.update(affine_connection=True), "skip transcoder"),
    (lambda p, c: p.update(affine_skip_connection=torch.zeros(D, D)), "skip transcoder"),
    (lambda p, c: p.update(w_dec=torch.zeros(F, 3, D)), "not publicly documented"),
    (lambda p, c: p.update(scaling_factor=torch.full((1,), 2.0)), "scaling_factor"),
    (lambda p, c: p.update(threshold=torch.zeros(F + 1)), "threshold has shape"),
    (lambda p, c: c.update(architecture="topk"), "is not jump_relu"),
    (lambda p, c: c.update(hf_hook_point_in="model.layers.3.self_attn.o_proj.input"), "a module's input"),
]


@pytest.mark.parametrize("change, message", REFUSALS)
def test_what_xc_cannot_express_is_refused_in_one_line(tmp_path, change, message):
    params, config = their_params(), {"model_name": "gemma-v3-1b-pt", "hf_hook_point_in": "model.layers.3.output"}
    change(params, config)
    folder = gemma_scope_2(tmp_path / "sae", params, **config)
    result = CliRunner().invoke(cli, ["import", str(folder), "-o", str(tmp_path / "xc.safetensors")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "xc.safetensors").exists()


def test_npz_object_arrays_are_never_unpickled(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    np.savez(folder / "params.npz", w_enc=np.array([{"a": 1}], dtype=object), w_dec=np.zeros((F, D)),
             threshold=np.zeros(F))
    with pytest.raises(BadInput, match="not a readable .npz of plain arrays"):
        import_dictionary(ImportConfig(folder, tmp_path / "xc.safetensors", sources=("m:resid_post:1",)))


def test_gemma_scope_2_transcoders_go_on_to_circuit_tracer(tmp_path):
    """Published transcoders to attribution graphs: two Gemma Scope 2 transcoder layers imported, exported as
    circuit-tracer's transcoder set; each layer file encodes and decodes as the Gemma Scope transcoder (circuit-
    tracer's documented JumpReLU, x * (x > threshold), and circuit-tracer itself where it is importable)."""
    from safetensors import safe_open

    from xcli.export import ExportConfig, export

    params, paths = [], []
    for layer in range(2):
        params.append(their_params(seed=layer))
        folder = gemma_scope_2(tmp_path / f"transcoder_l{layer}", params[-1], model_name="gemma-v3-270m-pt",
                               hf_hook_point_in=f"model.layers.{layer}.pre_feedforward_layernorm.output",
                               hf_hook_point_out=f"model.layers.{layer}.post_feedforward_layernorm.output")
        paths.append(import_dictionary(ImportConfig(folder, tmp_path / f"tc{layer}.safetensors")))
    out = export(ExportConfig(checkpoint=paths[0], transcoders=(paths[1],), output=tmp_path / "ct",
                              format="circuit-tracer", hooks=("ln2.hook_normalized", "hook_mlp_out")))
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(4)) * 2
    for layer, p in enumerate(params):
        with safe_open(str(out / f"layer_{layer}.safetensors"), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        pre = torch.nn.functional.linear(x, t["W_enc"], t["b_enc"])
        f_ct = pre * (pre > t["activation_function.threshold"])
        f_ref, x_ref = their_forward(p, x)
        torch.testing.assert_close(f_ct, f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f_ct @ t["W_dec"] + t["b_dec"], x_ref, rtol=1e-4, atol=1e-4)
    try:
        from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    except ImportError:
        return  # circuit-tracer pins transformers<=4.57.3: not installed with xc (docs/commands/xc-export.md)
    tset = load_transcoder_set({i: str(out / f"layer_{i}.safetensors") for i in range(2)}, scan="gemma-scope-2",
                               feature_input_hook="ln2.hook_normalized", feature_output_hook="hook_mlp_out",
                               device=torch.device("cpu"))
    for layer, p in enumerate(params):
        f_ref, x_ref = their_forward(p, x)
        torch.testing.assert_close(tset[layer].encode(x), f_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tset[layer].decode(f_ref), x_ref, rtol=1e-4, atol=1e-4)
