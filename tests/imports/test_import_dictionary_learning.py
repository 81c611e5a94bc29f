"""xc import of science-of-finetuning/dictionary_learning crosscoders: fixtures in their layout, encode and
decode checked against their formulas written out here, refusals, and consumers on the imported checkpoint."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from xcli.cli import cli
from xcli.crosscoder.model import load, read_metadata
from xcli.errors import BadInput
from xcli.imports import ImportConfig, detect, import_dictionary

L, D, F = 2, 8, 32
SOURCES = ("base:resid_post:13", "chat:resid_post:13")
CODES = {"CROSSCODER": 1, "SAE": 2, "MIXED": 3, "NONE": 4, "DECOUPLED": 5}


def their_state_dict(batchtopk=False, normaliser=True, code="CROSSCODER", seed=0, L=L, d=D, F=F, k=4):
    """A state dict named and shaped as their CrossCoder / BatchTopKCrossCoder saves it, random values."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "encoder.weight": torch.randn(L, d, F, generator=g) / d ** 0.5,
        "encoder.bias": torch.randn(F, generator=g) * 0.1,
        "decoder.weight": torch.randn(L, F, d, generator=g) * torch.rand(L, F, 1, generator=g),
        "decoder.bias": torch.randn(L, d, generator=g),
        "code_normalization_id": torch.tensor(CODES[code]),
        "target_rms": torch.tensor(1.0),
    }
    if normaliser:
        mean, std = torch.randn(L, d, generator=g) * 3, torch.rand(L, d, generator=g) * 2 + 0.5
        sd.update({"activation_mean": mean, "activation_std": std,
                   "activation_global_scale": 1.0 / torch.sqrt((std ** 2).sum(-1) + 1e-8)})
    else:
        sd.update({"activation_mean": torch.full((L, d), float("nan")),
                   "activation_std": torch.full((L, d), float("nan")), "activation_global_scale": torch.ones(L)})
    if batchtopk:
        sd["k"] = torch.tensor(k, dtype=torch.int)
        sd["threshold"] = torch.tensor(-1.0)
    return sd


def their_forward(sd, x):
    """Their inference, from their documented formulas: normalise, encode (ReLU, threshold on f * sum_l ||d||),
    decode, denormalise. x: (B, L, d) -> (f (B, F), x_hat (B, L, d))."""
    has_norm = not torch.isnan(sd["activation_mean"]).any()
    g = sd["activation_global_scale"][None, :, None]
    xn = (x - sd["activation_mean"]) * g if has_norm else x
    f = torch.relu(torch.einsum("bld,ldf->bf", xn, sd["encoder.weight"]) + sd["encoder.bias"])
    if "threshold" in sd:
        w = sd["decoder.weight"].norm(dim=2).sum(dim=0)
        f = f * (f * w > sd["threshold"])
    x_hat = torch.einsum("bf,lfd->bld", f, sd["decoder.weight"]) + sd["decoder.bias"]
    if has_norm:
        x_hat = x_hat / (g + 1e-8) + sd["activation_mean"]
    return f, x_hat


def inputs(sd, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = sd["activation_mean"] if not torch.isnan(sd["activation_mean"]).any() else 0
    return torch.randn(n, L, D, generator=g) * 2 + mean


def ours(path, x):
    model = load(path)
    names = [s.name for s in model.sources]
    with torch.no_grad():
        f = model.encode({n: x[:, i] for i, n in enumerate(names)})
        x_hat = model.decode(f)
    return f, torch.stack([x_hat[n] for n in names], dim=1)


def set_threshold_mid(sd, x):
    """A threshold that cuts about half of the positive scores: the rule matters in the comparison."""
    sd["threshold"] = torch.tensor(-1.0)
    f, _ = their_forward(sd, x)
    scores = (f * sd["decoder.weight"].norm(dim=2).sum(dim=0))
    positive = scores[scores > 0].sort().values
    middle = len(positive) // 2  # halfway between two scores: no score sits on the threshold's rounding edge
    sd["threshold"] = ((positive[middle - 1] + positive[middle]) / 2).reshape(())


@pytest.mark.parametrize("batchtopk", [False, True])
@pytest.mark.parametrize("normaliser", [False, True])
def test_torch_state_dict_encodes_and_decodes_as_theirs(tmp_path, batchtopk, normaliser):
    sd = their_state_dict(batchtopk, normaliser)
    x = inputs(sd)
    if batchtopk:
        set_threshold_mid(sd, x)
    torch.save(sd, tmp_path / "model_final.pt")
    out = import_dictionary(ImportConfig(tmp_path / "model_final.pt", tmp_path / "xc.safetensors", sources=SOURCES))
    f_ref, x_ref = their_forward(sd, x)
    f, x_hat = ours(out, x)
    if batchtopk:
        unthresholded = their_forward({**sd, "threshold": torch.tensor(-1.0)}, x)[0]
        assert 0 < int((f_ref > 0).sum()) < int((unthresholded > 0).sum())
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    meta = read_metadata(out)
    assert meta["arch"] == ("batchtopk" if batchtopk else "relu")
    assert [s["name"] for s in meta["sources"]] == ["base.resid_post.13", "chat.resid_post.13"]
    assert meta["sources"][1] == {"name": "chat.resid_post.13", "model": "chat", "site": "resid_post", "layer": 13,
                                  "d": D, "revision": None}
    rec = meta["imported"]
    assert rec["format"] == "dictionary_learning" and rec["code_normalization"] == "CROSSCODER"
    assert rec["class"] == ("BatchTopKCrossCoder" if batchtopk else "CrossCoder")
    if batchtopk:
        assert meta["k"] == 4 and rec["threshold"] == pytest.approx(float(sd["threshold"]))
    if normaliser:
        assert rec["input_scale"] == pytest.approx(sd["activation_global_scale"].tolist())


def test_hub_folder_with_config_and_compiled_prefix(tmp_path):
    """The hub mixin's layout (config.json + model.safetensors), keys with torch.compile's _orig_mod. prefix."""
    sd = their_state_dict(batchtopk=True)
    x = inputs(sd)
    set_threshold_mid(sd, x)
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in sd.items()}, str(hub / "model.safetensors"))
    (hub / "config.json").write_text(json.dumps({"activation_dim": D, "dict_size": F, "num_layers": L, "k": 4,
                                                 "code_normalization": "CROSSCODER",
                                                 "dict_class": "BatchTopKCrossCoder"}))
    assert detect(hub) == "dictionary-learning"
    out = import_dictionary(ImportConfig(hub, tmp_path / "xc.safetensors",
                                         sources=("base=google/gemma-2-2b:resid_post:13",
                                                  "chat=google/gemma-2-2b-it:resid_post:13")))
    f_ref, x_ref = their_forward(sd, x)
    f, x_hat = ours(out, x)
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_hat, x_ref, rtol=1e-4, atol=1e-4)
    meta = read_metadata(out)
    assert [s["model"] for s in meta["sources"]] == ["google/gemma-2-2b", "google/gemma-2-2b-it"]
    assert [s["name"] for s in meta["sources"]] == ["base", "chat"]
    assert meta["imported"]["config"]["dict_class"] == "BatchTopKCrossCoder"


def test_encoder_layers_subset_reads_only_those(tmp_path):
    """encoder_layers (hub config): the encoder reads a subset of the layers the decoder writes; the weights in
    pytorch_model.bin, as older versions of the hub mixin saved them."""
    sd = their_state_dict(normaliser=False)
    sd["encoder.weight"] = sd["encoder.weight"][1:]  # reads layer 1 only
    hub = tmp_path / "hub"
    hub.mkdir()
    torch.save(sd, hub / "pytorch_model.bin")  # the older hub mixin's weights file, loaded weights-only
    (hub / "config.json").write_text(json.dumps({"encoder_layers": [1], "dict_class": "CrossCoder"}))
    assert detect(hub) == "dictionary-learning"
    out = import_dictionary(ImportConfig(hub, tmp_path / "xc.safetensors", sources=SOURCES))
    model = load(out)
    assert model.read == ["chat.resid_post.13"] and model.write == ["base.resid_post.13", "chat.resid_post.13"]
    x = inputs(sd)
    f_ref = torch.relu(x[:, 1] @ sd["encoder.weight"][0] + sd["encoder.bias"])
    with torch.no_grad():
        f = model.encode({"chat.resid_post.13": x[:, 1]})
    torch.testing.assert_close(f, f_ref, rtol=1e-5, atol=1e-5)


def test_relu_crosscoder_of_any_code_normalisation_is_exact_and_recorded(tmp_path):
    sd = their_state_dict(code="SAE")
    torch.save(sd, tmp_path / "cc.pt")
    out = import_dictionary(ImportConfig(tmp_path / "cc.pt", tmp_path / "xc.safetensors", sources=SOURCES))
    x = inputs(sd)
    torch.testing.assert_close(ours(out, x)[1], their_forward(sd, x)[1], rtol=1e-4, atol=1e-4)
    assert read_metadata(out)["imported"]["code_normalization"] == "SAE"


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update(code_normalization_id=torch.tensor(2), threshold=torch.tensor(0.5)), "SAE code normal"),
    (lambda sd: sd.update(code_normalization_id=torch.tensor(5), threshold=torch.tensor([0.5, 0.5])), "DECOUPLED"),
    (lambda sd: sd.update(code_normalization_id=torch.tensor(9)), "is not one of"),
    (lambda sd: sd.update({"decoder.weight": torch.zeros(L, F, D + 1)}), "decoder.weight has shape"),
    (lambda sd: sd.update({"encoder.bias": torch.full((F,), float("nan"))}), "non-finite"),
    (lambda sd: sd.update(k=torch.tensor(F)), "k 32 must be between"),
])
def test_what_xc_cannot_express_is_refused_in_one_line(tmp_path, change, message):
    sd = their_state_dict(batchtopk=True)
    change(sd)
    torch.save(sd, tmp_path / "cc.pt")
    with pytest.raises(BadInput, match=message):
        import_dictionary(ImportConfig(tmp_path / "cc.pt", tmp_path / "xc.safetensors", sources=SOURCES))
    assert not (tmp_path / "xc.safetensors").exists()


def test_sources_are_required_and_counted(tmp_path):
    torch.save(their_state_dict(), tmp_path / "cc.pt")
    with pytest.raises(BadInput, match="has 2 layers; no --source given"):
        import_dictionary(ImportConfig(tmp_path / "cc.pt", tmp_path / "xc.safetensors"))
    with pytest.raises(BadInput, match="1 --source given"):
        import_dictionary(ImportConfig(tmp_path / "cc.pt", tmp_path / "xc.safetensors", sources=SOURCES[:1]))


class Payload:
    """Not a tensor: a weights-only load must refuse it instead of running its unpickling."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickled_objects_are_never_unpickled(tmp_path, capsys):
    sd = their_state_dict()
    sd["extra"] = Payload()
    torch.save(sd, tmp_path / "cc.pt")
    with pytest.raises(BadInput, match="not a weights-only torch state dict"):
        import_dictionary(ImportConfig(tmp_path / "cc.pt", tmp_path / "xc.safetensors", sources=SOURCES))
    assert "pickle code ran" not in capsys.readouterr().out


def test_unrecognised_inputs_are_one_line_exit_2(tmp_path):
    save_file({"weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "folder").mkdir()
    save_file({"w_enc": torch.zeros(4, 8), "w_dec": torch.zeros(8, 4), "threshold": torch.ones(8),
               "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)}, str(tmp_path / "params.safetensors"))
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "params.safetensors"), "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "no --source given" in result.output  # Gemma Scope's layout, no config
    for path in ("other.safetensors", "notes.txt", "folder", "missing.pt"):
        result = CliRunner().invoke(cli, ["import", str(tmp_path / path), "-o", str(tmp_path / "xc.safetensors")])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
    torch.save(their_state_dict(), tmp_path / "cc.pt")
    result = CliRunner().invoke(cli, ["import", str(tmp_path / "cc.pt"), "--format", "saelens", "-o",
                                      str(tmp_path / "xc.safetensors")])
    assert result.exit_code == 2 and "is not a SAELens folder" in result.output
    assert not (tmp_path / "xc.safetensors").exists()


def test_import_cli_then_classify_and_eval_on_a_store(tmp_path):
    """The imported checkpoint feeds xc classify and xc eval unchanged (sources named as the store's)."""
    from xcli.data.synth import make_store

    make_store(tmp_path / "acts.zarr", n_tokens=2048, sources=("a", "b"), d=D, chunk_rows=256)
    sd = their_state_dict(batchtopk=True)
    set_threshold_mid(sd, torch.randn(64, L, D))
    torch.save(sd, tmp_path / "model_final.pt")
    run = CliRunner().invoke(cli, ["import", str(tmp_path / "model_final.pt"), "-o", str(tmp_path / "xc.safetensors"),
                                   "--source", "a=a:synthetic", "--source", "b=b:synthetic"])
    assert run.exit_code == 0, run.output
    assert run.output.strip() == str(tmp_path / "xc.safetensors")
    rows = CliRunner().invoke(cli, ["classify", str(tmp_path / "xc.safetensors"), "--store", str(tmp_path / "acts.zarr")])
    assert rows.exit_code == 0, rows.output
    rows = rows.stdout.splitlines()
    assert len(rows) == F and {"latent", "class"} <= set(json.loads(rows[0]))
    report = CliRunner().invoke(cli, ["eval", str(tmp_path / "xc.safetensors"), str(tmp_path / "acts.zarr"),
                                      "--all-rows"])
    assert report.exit_code == 0, report.output
    report = json.loads(report.stdout)
    assert set(report["fvu"]) == {"a", "b"} and report["l0"] >= 0


def test_overwrite_replaces_only_an_xc_checkpoint_never_the_input(tmp_path):
    sd = their_state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "theirs.safetensors"))
    (tmp_path / "notes.safetensors").write_text("mine")
    args = ["import", str(tmp_path / "theirs.safetensors"), "--source", SOURCES[0], "--source", SOURCES[1], "-o"]
    cases = [([str(tmp_path / "notes.safetensors")], "already exists"),
             ([str(tmp_path / "notes.safetensors"), "--overwrite"], "is not an xc checkpoint"),
             ([str(tmp_path / "theirs.safetensors"), "--overwrite"], "is an input of this command")]
    for extra, message in cases:
        result = CliRunner().invoke(cli, args + extra)
        assert result.exit_code == 2 and message in result.output, result.output
    assert (tmp_path / "notes.safetensors").read_text() == "mine"
    for _ in range(2):  # the second run replaces what the first wrote
        result = CliRunner().invoke(cli, args + [str(tmp_path / "xc.safetensors"), "--overwrite"])
        assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "xc.safetensors")["imported"]["format"] == "dictionary_learning"
