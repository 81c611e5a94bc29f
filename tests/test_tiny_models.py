import torch
from transformers import AutoModel, AutoTokenizer

import tiny_models


def test_every_family_loads_offline_and_runs(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    batch = tok(["the cat sees a dog", "red car"], return_tensors="pt", padding=True)
    assert batch["input_ids"][0, 0].item() == tok.bos_token_id
    for family in tiny_models.FAMILIES:
        model = AutoModel.from_pretrained(tiny[family])
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        assert len(out.hidden_states) == tiny_models.LAYERS + 1
        assert out.hidden_states[-1].shape == (2, batch["input_ids"].shape[1], tiny_models.HIDDEN)


def test_shared_tokenizer_and_distinct_weights(tiny):
    a = AutoTokenizer.from_pretrained(tiny["gpt2"])
    b = AutoTokenizer.from_pretrained(tiny["bert"])
    assert a.get_vocab() == b.get_vocab()
    wa = AutoModel.from_pretrained(tiny["gpt2"]).wte.weight
    wb = AutoModel.from_pretrained(tiny["gpt2_b"]).wte.weight
    assert not torch.equal(wa, wb)
