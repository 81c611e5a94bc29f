"""One site resolution for harvest (base models) and amplify (causal LMs); one device check."""

import pytest
import torch

from xcli.devices import resolve_device
from xcli.errors import BadInput
from xcli.lm.config import SITES, ModelSpec
from xcli.lm.models import quiet_transformers
from xcli.lm.sites import resolve_site, resolve_sites


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_base_model_and_causal_lm_resolve_the_same_modules(tiny, family):
    """A source harvested from the base model is steered at the same module of the causal LM."""
    from transformers import AutoModel, AutoModelForCausalLM

    quiet_transformers()
    base = AutoModel.from_pretrained(tiny[family], local_files_only=True)
    lm = AutoModelForCausalLM.from_pretrained(tiny[family], local_files_only=True)
    block_path = {"gpt2": "h.{layer}", "gpt_neox": "layers.{layer}", "llama": "layers.{layer}"}[family]
    prefixed = f"{lm.base_model_prefix}.{block_path}"
    for site in (*SITES, block_path, prefixed):
        for layer in (0, 2):
            a, b = resolve_site(base, site, layer), resolve_site(lm, site, layer)
            name_a = next(n for n, m in base.named_modules() if m is a.module)
            name_b = next(n for n, m in lm.base_model.named_modules() if m is b.module)
            assert name_a == name_b and a.catch_input == b.catch_input == (site == "resid_pre"), (site, layer)
    # module paths name the block itself: the same module as resid_post
    assert resolve_site(lm, block_path, 1).module is resolve_site(lm, "resid_post", 1).module


def test_source_names_and_order_follow_the_harvest_convention(tiny):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny["gpt2"], local_files_only=True)
    got = [(s.name, s.layer) for s in resolve_sites(model, "m", ("resid_post", "h.{layer}.ln_1", "h.0.mlp"), [2, 0])]
    assert got == [("m.resid_post.2", 2), ("m.resid_post.0", 0), ("m.h.2.ln_1", 2), ("m.h.0.ln_1", 0),
                   ("m.h.0.mlp", None)]
    with pytest.raises(BadInput, match="not a named site"):
        resolve_site(model, "h.0.no_such_module")


def test_one_device_check():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, fragment in (("gpu", "is not a device"), ("meta", "not supported"), ("cuda:99", "not available")):
        with pytest.raises(BadInput, match=fragment):
            resolve_device(bad)


def test_model_specs_remember_whether_the_alias_was_given():
    assert ModelSpec.parse("chat=org/model@v1").alias_given
    derived = ModelSpec.parse("org/model")
    assert (derived.alias, derived.alias_given) == ("model", False)
    # amplify's --before/--after take no alias: a = is part of the id
    assert ModelSpec.parse("a=b", allow_alias=False).id == "a=b"
