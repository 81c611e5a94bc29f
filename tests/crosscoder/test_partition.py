"""Latent partitions (xcli.crosscoder.partition): tied gradients, dedicated zeros, the penalty, the metadata."""

import json

import pytest
import torch

from xcli.crosscoder.model import Crosscoder, check_metadata, load, save
from xcli.crosscoder.partition import Block, Partition
from xcli.errors import BadInput
from xcli.source import Source
from xcli.train import loop as tr

SOURCES = [Source("a.resid.1", "a", "resid", 1, 5), Source("a.resid.2", "a", "resid", 2, 4),
           Source("b.resid.1", "b", "resid", 1, 5), Source("b.resid.2", "b", "resid", 2, 4)]
PARTITION = Partition.layout(3, {"a": 2, "b": 2}, shared_penalty=0.2)  # tied 0-2, a 3-4, b 5-6, free 7-11


def model(arch="relu", k=None, seed=0) -> Crosscoder:
    m = Crosscoder(SOURCES, 12, arch, k)
    m.init_weights(torch.Generator().manual_seed(seed), decoder_norm=0.5)
    with torch.no_grad():
        m.b_enc.fill_(0.3)
    m.partition = PARTITION
    PARTITION.enforce(m)
    return m


def batch(seed=1, rows=16):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn(rows, s.d, generator=g) for s in SOURCES}


def test_layout_puts_the_tied_block_first_then_one_dedicated_block_per_model_in_order():
    assert PARTITION.tied == (0, 3)
    assert PARTITION.dedicated == (Block("a", 3, 5), Block("b", 5, 7))
    assert PARTITION.latent_roles(8) == ["tied"] * 3 + ["dedicated:a"] * 2 + ["dedicated:b"] * 2 + [None]


def test_tied_gradient_is_the_gradient_of_one_parameter_used_by_both_models():
    """Reference: the tied rows as ONE parameter P that both models' decoders use (autograd sums the two uses)."""
    m, x = model(), batch()
    loss = tr.loss_parts(m, x, 0.0, torch.zeros(12, dtype=torch.bool), 0).loss
    loss.backward()
    PARTITION.fix_gradients(m)
    for layer_a, layer_b in (("a.resid.1", "b.resid.1"), ("a.resid.2", "b.resid.2")):
        ref = Crosscoder(SOURCES, 12, "relu")
        ref.load_state_dict(m.state_dict())
        shared = torch.nn.Parameter(m.decoder_weight(layer_a)[:3].detach().clone())
        pre = ref.pre_activations(x)
        f = torch.relu(pre)
        recon = 0
        for s in SOURCES:
            w = ref.decoder_weight(s.name).detach()
            if s.name in (layer_a, layer_b):
                w = torch.cat([shared, w[3:]])
            y = f @ w + ref.decoder_bias(s.name).detach()
            recon = recon + (x[s.name] * ref.scale(s.name) - y).pow(2).sum() / 16
        recon.backward()
        assert torch.allclose(m.decoder_weight(layer_a).grad[:3], shared.grad, atol=1e-5)
        assert torch.equal(m.decoder_weight(layer_a).grad[:3], m.decoder_weight(layer_b).grad[:3])


def test_dedicated_rows_get_no_gradient_and_stay_exactly_zero_through_adam():
    m = model()
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for step in range(5):
        opt.zero_grad()
        tr.loss_parts(m, batch(step), 0.1, torch.zeros(12, dtype=torch.bool), 0).loss.backward()
        PARTITION.fix_gradients(m)
        assert not m.decoder_weight("b.resid.1").grad[3:5].any()  # a's latents, b's decoder
        assert not m.decoder_weight("a.resid.2").grad[5:7].any()
        opt.step()
        PARTITION.enforce(m)
    for s in SOURCES:
        other = slice(5, 7) if s.model == "a" else slice(3, 5)
        own = slice(3, 5) if s.model == "a" else slice(5, 7)
        assert not m.decoder_weight(s.name)[other].any()
        assert m.decoder_weight(s.name)[own].abs().min() > 0  # the model's own rows train
    assert torch.equal(m.decoder_weight("a.resid.1")[:3], m.decoder_weight("b.resid.1")[:3])
    assert not torch.equal(m.decoder_weight("a.resid.1")[7:], m.decoder_weight("b.resid.1")[7:])


def test_relu_penalty_of_tied_latents_is_scaled_by_the_shared_penalty():
    m, x = model(), batch()
    parts = tr.loss_parts(m, x, 2.0, torch.zeros(12, dtype=torch.bool), 0)
    with torch.no_grad():
        f = torch.relu(m.pre_activations(x))
        norms = torch.stack([m.decoder_weight(s.name).norm(dim=1) for s in SOURCES], 1).sum(1)
        weight = torch.tensor([0.2] * 3 + [1.0] * 9)
        expected = 2.0 * sum(float(f[t, i] * norms[i] * weight[i]) for t in range(16) for i in range(12)) / 16
    assert parts.sparsity.item() == pytest.approx(expected, rel=1e-5)


def test_partition_round_trips_through_a_checkpoint(tmp_path):
    m = model("batchtopk", k=2)
    save(m, tmp_path / "x.safetensors")
    loaded = load(tmp_path / "x.safetensors")
    assert loaded.partition == PARTITION
    assert loaded.metadata["partition"] == {"tied": {"start": 0, "stop": 3, "penalty": 0.2},
                                            "dedicated": [{"model": "a", "start": 3, "stop": 5},
                                                          {"model": "b", "start": 5, "stop": 7}]}


def meta_with(partition) -> dict:
    meta = model().describe()
    meta["partition"] = partition
    return json.loads(json.dumps(meta))


GOOD = {"tied": {"start": 0, "stop": 3, "penalty": 0.2}, "dedicated": [{"model": "a", "start": 3, "stop": 5}]}


@pytest.mark.parametrize("partition, fragment", [
    ({**GOOD, "tied": {"start": 0, "stop": 13}}, "not a non-empty range of latents 0 to 12"),
    ({**GOOD, "tied": {"start": 2, "stop": 2}}, "not a non-empty range"),
    ({**GOOD, "dedicated": [{"model": "a", "start": 2, "stop": 5}]}, "tied and dedicated:a overlap"),
    ({**GOOD, "dedicated": [{"model": "c", "start": 3, "stop": 5}]}, "names a model that writes no source"),
    ({**GOOD, "dedicated": [{"model": "a", "start": 3, "stop": 4}, {"model": "a", "start": 4, "stop": 5}]},
     "twice"),
    ({**GOOD, "tied": {"start": 0, "stop": 3, "penalty": 0}}, "penalty 0 is not a number in (0, 1]"),
    ({**GOOD, "dedicated": "a=2"}, "is not a list of blocks"),
    ({**GOOD, "dedicated": [{"model": "a", "start": "3", "stop": 5}]}, "is not {model, start, stop}"),
    ([1, 2], "is not an object with tied and dedicated"),
])
def test_bad_partitions_in_metadata_are_one_line_naming_the_checkpoint(partition, fragment):
    with pytest.raises(BadInput, match="^checkpoint 'x': .*" + fragment.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        check_metadata(meta_with(partition), "checkpoint 'x'")


def test_tied_latents_need_the_same_sites_layers_and_widths_in_every_model():
    meta = meta_with(GOOD)
    meta["sources"][3]["d"] = 6  # b.resid.2 wider than a.resid.2
    with pytest.raises(BadInput, match="equal width; a.resid.2, b.resid.2 have widths"):
        check_metadata(meta, "checkpoint 'x'")
    meta = meta_with(GOOD)
    meta["sources"][3]["layer"] = 3
    with pytest.raises(BadInput, match="same sites and layers"):
        check_metadata(meta, "checkpoint 'x'")
    one_model = meta_with({"tied": None, "dedicated": [{"model": "a", "start": 0, "stop": 2}]})
    for s in one_model["sources"]:
        s["model"] = "a"
    with pytest.raises(BadInput, match="two or more models"):
        check_metadata(one_model, "checkpoint 'x'")


def test_a_checkpoint_whose_weights_break_its_partition_is_refused(tmp_path):
    m = model()
    with torch.no_grad():
        m.decoder_weight("b.resid.2")[3, 0] = 1e-3  # a's dedicated latent writes b
    save(m, tmp_path / "x.safetensors")
    with pytest.raises(BadInput, match="decoder.b.resid.2 is not zero on the latents \\[3, 5\\) dedicated to model a"):
        load(tmp_path / "x.safetensors")
    m = model()
    with torch.no_grad():
        m.decoder_weight("b.resid.1")[0, 0] += 1e-3
    save(m, tmp_path / "y.safetensors")
    with pytest.raises(BadInput, match="tied latents \\[0, 3\\) differ between a.resid.1, b.resid.1"):
        load(tmp_path / "y.safetensors")
