"""xc import of oli-clive-griffin/crosscode crosscoders: checkpoints built in its saved layout (a step folder of
model.pt + model_cfg.yaml under an experiment folder with experiment_config.yaml), encode and decode checked
against its forward written out here from crosscode/models/base_crosscoder.py and its activations, with
the activation scaling it folds at save time applied the other way round (the unfolded model on scaled
inputs), and its refusals."""

import pytest
import torch
import yaml
from click.testing import CliRunner

from xcli.cli import cli
from xcli.crosscoder.model import load, read_metadata
from xcli.errors import BadInput
from xcli.imports import ImportConfig, detect, import_dictionary

M, P, D, F = 2, 2, 6, 24
LLMS = [{"name": "EleutherAI/pythia-70m", "revision": None}, {"name": "EleutherAI/pythia-70m-deduped",
                                                              "revision": None}]
HOOKS = ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]
NAMES = ["pythia-70m.resid_post.3", "pythia-70m.resid_post.5", "pythia-70m-deduped.resid_post.3",
         "pythia-70m-deduped.resid_post.5"]


def unfolded(seed=0, Xi=(M, P), Xo=(M, P), d_in=D, d_out=D):
    """A crosscoder as crosscode trains it (on scaled activations), with the scaling factors of each
    (model, hookpoint): random values in their tensor shapes."""
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(*Xi, d_in, F, generator=g) / (d_in * max(1, len(Xi))) ** 0.5,
        "W_dec": torch.randn(F, *Xo, d_out, generator=g) * torch.rand(F, *Xo, 1, generator=g),
        "b_enc": torch.randn(F, generator=g) * 0.2,
        "b_dec": torch.randn(*Xo, d_out, generator=g),
        "s_in": torch.rand(Xi, generator=g) + 0.5,
        "s_out": torch.rand(Xo, generator=g) + 0.5,
        "log_threshold": torch.randn(F, generator=g) * 0.3 - 1.0,
    }


def their_state_dict(w, jumprelu=False, prefix="_activation_fn"):
    """What model.state_dict() of a saved crosscode crosscoder holds: the weights with the scaling factors
    folded in as their _fold_activation_scaling_into_weights_ does (W_enc * s_in, W_dec and b_dec / s_out)."""
    sd = {
        "_W_enc_XiDiL": w["W_enc"] * w["s_in"][..., None, None],
        "_W_dec_LXoDo": w["W_dec"] / w["s_out"][..., None],
        "b_enc_L": w["b_enc"].clone(),
        "_b_dec_XoDo": w["b_dec"] / w["s_out"][..., None],
        "folded_scaling_factors_in_Xi": w["s_in"].clone(),
        "folded_scaling_factors_out_Xo": w["s_out"].clone(),
        "is_folded": torch.tensor(True),
    }
    if jumprelu:
        sd[f"{prefix}.log_threshold_L"] = w["log_threshold"].clone()
    return sd


def model_cfg(classname="ReLUActivation", act_cfg=None):
    """ModelHookpointAcausalCrosscoder._dump_cfg()."""
    return {"n_models": M, "n_hookpoints": P, "d_model": D, "n_latents": F,
            "activation_fn": {"classname": classname, "cfg": act_cfg or {}},
            "use_encoder_bias": True, "use_decoder_bias": True, "dtype": "float32"}


def save_checkpoint(root, sd, cfg, experiment=True, llms=LLMS):
    """Their trainer's layout: <save_dir>/experiment_config.yaml and <save_dir>/step_N/{model.pt, model_cfg.yaml}."""
    step = root / "exp_2025-03-01_12-00-00" / "step_1000"
    step.mkdir(parents=True)
    torch.save(sd, step / "model.pt")
    (step / "model_cfg.yaml").write_text(yaml.dump(cfg))
    if experiment:  # yaml.dump of the pydantic model_dump(): tuples carry a !!python/tuple tag
        exp = {"experiment_name": "exp_2025-03-01_12-00-00", "hookpoints": HOOKS,
               "data": {"activations_harvester": {"llms": llms, "harvesting_batch_size": 4}},
               "train": {"optimizer": {"type": "adam", "betas": (0.0, 0.999)}}}
        (step.parent / "experiment_config.yaml").write_text(yaml.dump(exp))
    return step


def their_activation(p, classname, w=None, k=None):
    if classname == "ReLUActivation":
        return torch.relu(p)
    if classname == "TopkActivation":
        values, idx = p.topk(k, dim=-1, sorted=False)
        return torch.zeros_like(p).scatter(-1, idx, values)
    return p * (p > w["log_threshold"].exp())  # AnthropicJumpReLU.forward


def their_forward(w, x, classname="ReLUActivation", k=None):
    """The unfolded crosscoder on scaled activations, output scaled back: what the folded one computes on raw
    activations. x: (B, *Xi, D) -> (f (B, F), x_hat (B, *Xo, D))."""
    xs = x * w["s_in"][..., None]
    p = torch.einsum("b...d,...dl->bl", xs, w["W_enc"]) + w["b_enc"]
    f = their_activation(p, classname, w, k)
    x_hat = torch.einsum("bl,l...->b...", f, w["W_dec"]) + w["b_dec"]
    return f, x_hat / w["s_out"][..., None]


def inputs(n=64, shape=(M, P), d=D, seed=1):
    return torch.randn(n, *shape, d, generator=torch.Generator().manual_seed(seed)) * 3


def ours(path, x, names=NAMES):
    """The imported checkpoint on x (B, M, P, D), sources model-major -> (f, x_hat (B, M, P, D))."""
    model = load(path)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    with torch.no_grad():
        f = model.encode({n: flat[:, i] for i, n in enumerate(names)})
        x_hat = model.decode(f)
    return f, torch.stack([x_hat[n] for n in model.write], dim=1).reshape(x.shape[0], *x.shape[1:-1], -1)


def test_relu_crosscoder_folder_encodes_and_decodes_as_theirs(tmp_path):
    w = unfolded()
    step = save_checkpoint(tmp_path, their_state_dict(w), model_cfg())
    assert detect(step) == "crosscode" and detect(step / "model.pt") == "crosscode"
    out = import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors"))
    x = inputs()
    f_ref, x_ref = their_forward(w, x)
    f, x_hat = ours(out, x)
    assert 0 < int((f_ref > 0).sum()) < f_ref.numel()
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    meta = read_metadata(out)
    assert meta["arch"] == "relu" and [s["name"] for s in meta["sources"]] == NAMES
    assert meta["sources"][2] == {"name": NAMES[2], "model": "EleutherAI/pythia-70m-deduped", "site": "resid_post",
                                  "layer": 3, "d": D, "revision": None}
    rec = meta["imported"]
    assert rec["format"] == "crosscode" and rec["activation"] == "ReLUActivation"
    assert rec["folded_scaling_factors"]["folded_scaling_factors_in_Xi"] == pytest.approx(w["s_in"].flatten().tolist())
    assert rec["sources_from"].endswith("experiment_config.yaml")
    assert torch.equal(load(out).input_scale, torch.ones(M * P))


def test_sources_from_the_command_line_and_revisions(tmp_path):
    """--source overrides the experiment config (model-major order); one model at two revisions is told apart
    by the revision in the source name."""
    w = unfolded()
    llms = [{"name": "EleutherAI/pythia-70m", "revision": "step1000"},
            {"name": "EleutherAI/pythia-70m", "revision": "step143000"}]
    step = save_checkpoint(tmp_path, their_state_dict(w), model_cfg(), llms=llms)
    meta = read_metadata(import_dictionary(ImportConfig(step, tmp_path / "a.safetensors")))
    assert [s["name"] for s in meta["sources"]] == ["pythia-70m.resid_post.3.step1000", "pythia-70m.resid_post.5.step1000",
                                                    "pythia-70m.resid_post.3.step143000",
                                                    "pythia-70m.resid_post.5.step143000"]
    assert [s["revision"] for s in meta["sources"]] == ["step1000", "step1000", "step143000", "step143000"]
    specs = ("a3=m:resid_post:3", "a5=m:resid_post:5", "b3=n:resid_post:3", "b5=n:resid_post:5")
    out = import_dictionary(ImportConfig(step / "model.pt", tmp_path / "b.safetensors", sources=specs))
    x = inputs()
    torch.testing.assert_close(ours(out, x, ["a3", "a5", "b3", "b5"])[1], their_forward(w, x)[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(BadInput, match="has 4 \\(model, hookpoint\\) pairs; 2 --source given"):
        import_dictionary(ImportConfig(step, tmp_path / "c.safetensors", sources=specs[:2]))


def test_topk_with_equal_decoder_norms_differs_only_by_their_negative_picks(tmp_path):
    """Their TopK keeps the k largest pre-activations as they are; with one summed decoder norm per latent
    xc picks the same latents, and sets the negative ones among them to 0."""
    w = unfolded()
    norms = w["W_dec"].norm(dim=-1).sum(dim=(1, 2))
    w["W_dec"] = w["W_dec"] / norms[:, None, None, None] * 2.0  # one summed norm for every latent
    w["s_out"] = torch.ones(M, P)  # folding divides each source's rows by s_out, which would make them differ
    k = 4
    w["b_enc"] = w["b_enc"] - 2.5  # some tokens have fewer than k positive pre-activations
    step = save_checkpoint(tmp_path, their_state_dict(w), model_cfg("TopkActivation", {"k": k}))
    out = import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors"))
    x = inputs(256)
    f_ref, _ = their_forward(w, x, "TopkActivation", k)
    f, x_hat = ours(out, x)
    assert bool((f_ref < 0).any()) and bool((f_ref > 0).any())
    torch.testing.assert_close(f, torch.relu(f_ref), rtol=1e-5, atol=1e-5)
    x_ref = torch.einsum("bl,l...->b...", torch.relu(f_ref), w["W_dec"]) + w["b_dec"]  # s_out is 1
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    meta = read_metadata(out)
    assert meta["arch"] == "topk" and meta["k"] == k and "negative" in meta["imported"]["topk"]


@pytest.mark.parametrize("prefix", ["_activation_fn", "activation_fn"])
def test_jumprelu_thresholds_are_kept_per_latent(tmp_path, prefix):
    w = unfolded()
    step = save_checkpoint(tmp_path, their_state_dict(w, jumprelu=True, prefix=prefix),
                           model_cfg("AnthropicSTEJumpReLUActivation", {"size": F, "bandwidth": 2.0}))
    out = import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors"))
    x = inputs()
    f_ref, x_ref = their_forward(w, x, "AnthropicSTEJumpReLUActivation")
    relu_only = their_forward(w, x)[0]
    assert 0 < int((f_ref > 0).sum()) < int((relu_only > 0).sum())  # the thresholds cut latents
    f, x_hat = ours(out, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    assert read_metadata(out)["arch"] == "jumprelu"


def test_cross_layer_transcoder_reads_one_source_and_writes_each_layer(tmp_path):
    """CrossLayerTranscoder: Xi = () (one input), Xo = (n_layers_out,); model_cfg d_model, n_layers_out."""
    n_out = 3
    w = unfolded(Xi=(), Xo=(n_out,))
    cfg = {"d_model": D, "n_layers_out": n_out, "n_latents": F,
           "activation_fn": {"classname": "ReLUActivation", "cfg": {}}, "use_encoder_bias": True,
           "use_decoder_bias": True, "dtype": "float32"}
    step = save_checkpoint(tmp_path, their_state_dict(w), cfg, experiment=False)
    specs = ("in=m:blocks.{layer}.ln2.hook_normalized:0", "o0=m:mlp_out:0", "o1=m:mlp_out:1", "o2=m:mlp_out:2")
    out = import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors", sources=specs))
    model = load(out)
    assert model.read == ["in"] and model.write == ["o0", "o1", "o2"]
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(3))
    f_ref, x_ref = their_forward(w, x)
    with torch.no_grad():
        f = model.encode({"in": x})
        x_hat = torch.stack([model.decode(f)[n] for n in model.write], dim=1)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)


def test_older_model_diffing_names(tmp_path):
    """model_diffing's AcausalCrosscoder: W_enc_XDH, b_enc_H, W_dec_HXD, b_dec_XD, folded_scaling_factors_X, and a
    model_cfg.yaml with crosscoding_dims (a !!python/tuple), hidden_dim and hidden_activation_classname."""
    w = unfolded(Xi=(M,), Xo=(M,))
    w["s_out"] = w["s_in"]  # one set of factors, in and out
    new = their_state_dict(w)
    sd = {"W_enc_XDH": new["_W_enc_XiDiL"], "b_enc_H": new["b_enc_L"], "W_dec_HXD": new["_W_dec_LXoDo"],
          "b_dec_XD": new["_b_dec_XoDo"], "folded_scaling_factors_X": w["s_in"], "is_folded": torch.tensor(True)}
    cfg = {"crosscoding_dims": (M,), "d_model": D, "hidden_dim": F, "hidden_activation_classname": "ReLUActivation",
           "hidden_activation_cfg": {}}
    step = save_checkpoint(tmp_path, sd, cfg, experiment=False)
    assert "!!python/tuple" in (step / "model_cfg.yaml").read_text()
    out = import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors", sources=("a=a:resid_post:1", "b=b:resid_post:1")))
    x = inputs(shape=(M,))
    f_ref, x_ref = their_forward(w, x)
    f, x_hat = ours(out, x, ["a", "b"])
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)


def refuse_cases():
    def cfg_with(**kwargs):
        return lambda sd, cfg: cfg.update(kwargs)

    def sd_with(**kwargs):
        return lambda sd, cfg: sd.update(kwargs)

    cases = [
        (cfg_with(activation_fn={"classname": "BatchTopkActivation", "cfg": {"k_per_example": 4}}), "depends on the batch"),
        (cfg_with(activation_fn={"classname": "GroupMaxActivation", "cfg": {"k_groups": 4, "latents_size": F}}),
         "GroupMaxActivation"),
        (cfg_with(activation_fn={"classname": "TopkActivation", "cfg": {"k": 4}}), "summed decoder norms differ"),
        (cfg_with(activation_fn={"classname": "Sigmoid", "cfg": {}}), "'Sigmoid' is not one xc imports"),
        (cfg_with(n_latents=F + 1), "says n_latents 25"),
        (sd_with(is_folded=torch.tensor(False)), "is_folded is false"),
        (sd_with(W_skip_XdXd=torch.zeros(3, 3)), "skip connection"),
        (sd_with(b_enc_L=torch.full((F,), float("nan"))), "non-finite"),
        (sd_with(b_enc_L=torch.zeros(F + 1)), "b_enc_L has shape"),
        (lambda sd, cfg: (sd.pop("_activation_fn.log_threshold_L"),
                          cfg.update(activation_fn={"classname": "AnthropicSTEJumpReLUActivation", "cfg": {}})),
         "without its log_threshold_L"),
    ]
    return cases


@pytest.mark.parametrize("change, message", refuse_cases())
def test_what_xc_cannot_express_is_refused_in_one_line(tmp_path, change, message):
    w = unfolded()
    sd, cfg = their_state_dict(w, jumprelu=True), model_cfg()
    change(sd, cfg)
    step = save_checkpoint(tmp_path, sd, cfg)
    with pytest.raises(BadInput, match=message):
        import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors"))
    assert not (tmp_path / "xc.safetensors").exists()


def test_python_objects_in_its_yaml_are_never_built(tmp_path):
    """yaml.safe_load's rules, plus !!python/tuple: a tag that would call Python is refused."""
    w = unfolded()
    step = save_checkpoint(tmp_path, their_state_dict(w), model_cfg())
    (step / "model_cfg.yaml").write_text("n_latents: !!python/object/apply:os.system ['echo pwned']\n")
    result = CliRunner().invoke(cli, ["import", str(step), "-o", str(tmp_path / "xc.safetensors")])
    assert result.exit_code == 2 and "is not plain YAML" in result.output
    assert "pwned" not in result.output and len(result.output.strip().splitlines()) == 1
    (step / "model_cfg.yaml").unlink()  # without it, ReLU and TopK cannot be told apart
    result = CliRunner().invoke(cli, ["import", str(step), "-o", str(tmp_path / "xc.safetensors")])
    assert result.exit_code == 2 and "cannot tell which" in result.output


def test_unknown_tensors_are_refused(tmp_path):
    sd = their_state_dict(unfolded())
    sd["_activation_fn.gate_L"] = torch.ones(F)
    step = save_checkpoint(tmp_path, sd, model_cfg())
    with pytest.raises(BadInput, match="_activation_fn.gate_L"):
        import_dictionary(ImportConfig(step, tmp_path / "xc.safetensors"))


def test_a_model_diffing_crosscoder_feeds_classify(tmp_path):
    """Two models, one hookpoint (their model-diffing shape), JumpReLU: xc classify runs on it unchanged, with the
    sources named as the store's."""
    import json

    from xcli.data.synth import make_store

    make_store(tmp_path / "acts.zarr", n_tokens=512, sources=("a", "b"), d=D, chunk_rows=256)
    w = unfolded(Xi=(2, 1), Xo=(2, 1))
    sd = their_state_dict(w, jumprelu=True)
    cfg = {**model_cfg("AnthropicSTEJumpReLUActivation", {"size": F, "bandwidth": 2.0}), "n_models": 2,
           "n_hookpoints": 1}
    step = save_checkpoint(tmp_path, sd, cfg, experiment=False)
    result = CliRunner().invoke(cli, ["import", str(step), "-o", str(tmp_path / "xc.safetensors"),
                                      "--source", "a=a:synthetic", "--source", "b=b:synthetic"])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["classify", str(tmp_path / "xc.safetensors"), "--store",
                                      str(tmp_path / "acts.zarr")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == F and {"latent", "class"} <= set(rows[0])
