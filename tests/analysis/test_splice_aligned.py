"""xc eval --splice on an aligned store: each model spliced in its own tokens (xcli.analysis.splice_aligned).

Three tiny models with different tokenizers and widths (byte-level BPE + GPT-2 32 wide, WordPiece + BERT
48 wide, word-level + Llama 24 wide) on text with non-ASCII characters. The brute force rebuilds each model's
window from its own tokenization of the document, splices the reconstruction of the stored rows in one
position at a time with a plain forward hook, and computes CE and KL position by position.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_models
from xcli.analysis.splice import SpliceConfig, spliced_loss
from xcli.analysis.splice_aligned import aligned_spliced_loss
from xcli.cli import cli
from xcli.crosscoder.model import load
from xcli.data import store as st
from xcli.data.harvest import HarvestConfig, harvest
from xcli.data.loader import StoreSet
from xcli.errors import BadInput
from xcli.lm.config import ModelSpec
from xcli.train import TrainConfig, train

NAMES = tuple(tiny_models.ALIGNED_MODELS)  # bpe, wordpiece, words
CAUSAL = ("bpe", "words")  # BERT has no causal LM head: read, not scored


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("splice_aligned")
    paths = tiny_models.build_aligned_models(root)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(tiny_models.aligned_corpus(8, seed=5)) + "\n", encoding="utf-8")
    specs = tuple(ModelSpec(alias=n, id=str(paths[n])) for n in NAMES)
    store = harvest(HarvestConfig(models=specs, data=str(corpus), output=root / "s.zarr", align=True, layers="1",
                                  context_length=16, batch_size=4, chunk_rows=32, store_dtype="float32"))
    ckpt = train(TrainConfig(stores=(str(store),), output=str(root / "xc.safetensors"), arch="topk", latents=64,
                             k=4, steps=30, batch_size=64, eval_fraction=0.0, device="cpu"))
    return {**paths, "corpus": corpus, "store": store, "ckpt": ckpt}


def block(model, layer: int):
    inner = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    return inner[layer]


def brute_force(setup, name: str, evaluated: set[int]) -> dict:
    """CE and KL of model `name`, clean, spliced and ablated, one window at a time and one position at a time."""
    store = st.open_store(setup["store"])
    crosscoder = load(setup["ckpt"])
    rows = store.aligned_arrays()
    sequence = store.token_arrays()["sequence"]
    documents = setup["corpus"].read_text(encoding="utf-8").splitlines()
    tokenizer = AutoTokenizer.from_pretrained(setup[name])
    model = AutoModelForCausalLM.from_pretrained(setup[name]).eval()
    prefix, suffix = (store.alignment["packings"][name][k] for k in ("prefix", "suffix"))
    acts = {n: torch.from_numpy(store.read(n, 0, store.n_tokens)) for n in store.names}
    sums = dict.fromkeys(("tokens", "ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated"), 0.0)
    positions = spliced = 0
    for seq in np.unique(sequence):
        index = np.nonzero(sequence == seq)[0]
        if not any(r // store.chunk_rows in evaluated for r in index):
            continue
        doc = documents[rows["document"][index[0]]]
        encoded = tokenizer(doc, add_special_tokens=False, return_offsets_mapping=True)
        offsets = np.asarray(encoded["offset_mapping"])
        # the token of the document ending at each row's last character (the last such token)
        ends = [max(i for i in range(len(offsets)) if offsets[i, 1] == rows["char_end"][r]) for r in index]
        pos = rows[f"aligned/{name}/position"][index]
        first = ends[0] - (int(pos[0]) - len(prefix))
        window = prefix + encoded["input_ids"][first:ends[-1] + 1] + suffix
        assert [window[p] for p in pos] == rows[f"aligned/{name}/tokens"][index].tolist()
        positions += len(window) - len(prefix) - len(suffix)
        spliced += len(index)
        with torch.no_grad():
            recon = crosscoder.decode(crosscoder.encode({n: a[index] for n, a in acts.items()}))[f"{name}.resid_post.1"]

        def logp(replace, window=window, pos=pos):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                hidden = hidden.clone()
                for row, p in enumerate(pos):
                    hidden[0, p] = replace[row]
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            handle = block(model, 1).register_forward_hook(hook) if replace is not None else None
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([window])).logits[0]
            if handle is not None:
                handle.remove()
            return torch.log_softmax(logits.double(), -1)

        clean, runs = logp(None), {"spliced": logp(recon), "ablated": logp(torch.zeros_like(recon))}
        for row, p in zip(index, pos):
            if row // store.chunk_rows not in evaluated or p + 1 >= len(window):
                continue
            target = window[p + 1]
            sums["tokens"] += 1
            sums["ce_clean"] += -float(clean[p, target])
            for key, other in runs.items():
                sums[f"ce_{key}"] += -float(other[p, target])
                sums[f"kl_{key}"] += float((clean[p].exp() * (clean[p] - other[p])).sum())
    n = sums.pop("tokens")
    return {"tokens": n, **{k: v / n for k, v in sums.items()}, "positions": positions, "spliced": spliced}


def test_spliced_loss_per_model_equals_brute_force(setup):
    stores = StoreSet([str(setup["store"])])
    assert stores.n_chunks >= 4
    evaluated = {0, 2, 3}
    chunks = np.array(sorted(evaluated))
    result = aligned_spliced_loss(load(setup["ckpt"]), stores, chunks, SpliceConfig(windows=1000))
    assert set(result) == set(NAMES)
    assert "loss" not in result["wordpiece"] and "no causal language-model head" in result["wordpiece"]["note"]
    for name in CAUSAL:
        expected, got = brute_force(setup, name, evaluated), result[name]
        assert got["tokens"] == expected["tokens"] > 20
        assert (got["positions"], got["spliced"]) == (expected["positions"], expected["spliced"])
        assert got["spliced_fraction"] == pytest.approx(expected["spliced"] / expected["positions"])
        for key in ("ce_clean", "ce_spliced", "ce_ablated", "kl_spliced", "kl_ablated"):
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), (name, key)
        assert got["ce_increase"] == pytest.approx(got["ce_spliced"] - got["ce_clean"])
        assert got["ce_score"] == pytest.approx((got["ce_ablated"] - got["ce_spliced"])
                                                / (got["ce_ablated"] - got["ce_clean"]))
    with pytest.raises(BadInput, match="aligned_spliced_loss"):  # the single-tokenizer measure refuses
        spliced_loss(load(setup["ckpt"]), stores, chunks, SpliceConfig())
    # Byte-level BPE splits non-ASCII characters into several tokens: not every position is a row.
    assert result["bpe"]["spliced_fraction"] < 1 and result["bpe"]["positions"] != result["words"]["positions"]


def test_data_file_gives_the_store_windows_and_the_cli_reports_each_model(setup, tmp_path):
    crosscoder, stores = load(setup["ckpt"]), StoreSet([str(setup["store"])])
    every = np.arange(stores.n_chunks)
    from_store = aligned_spliced_loss(crosscoder, stores, every, SpliceConfig(windows=1000))
    from_text = aligned_spliced_loss(crosscoder, stores, every,
                                     SpliceConfig(windows=1000, data=str(setup["corpus"])))
    for name in CAUSAL:
        for key in ("tokens", "positions", "spliced", "ce_clean", "ce_spliced", "ce_ablated"):
            assert from_text[name][key] == pytest.approx(from_store[name][key], rel=1e-6), (name, key)

    result = CliRunner().invoke(cli, ["eval", str(setup["ckpt"]), str(setup["store"]), "--all-rows", "--splice",
                                      "--windows", "3", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    splice = json.loads(result.stdout)["splice"]
    assert {n: splice[n]["windows"] for n in NAMES} == dict.fromkeys(NAMES, 3)
    assert all(0 < splice[n]["spliced_fraction"] <= 1 and splice[n]["ce_clean"] > 0 for n in CAUSAL)

    # A corpus edited since the harvest cannot rebuild the store's windows: one line naming --data.
    corpus, text = setup["corpus"], setup["corpus"].read_text(encoding="utf-8")
    try:
        corpus.write_text(text.replace("the", "a"), encoding="utf-8")
        result = CliRunner().invoke(cli, ["eval", str(setup["ckpt"]), str(setup["store"]), "--all-rows",
                                          "--splice", "--device", "cpu"])
    finally:
        corpus.write_text(text, encoding="utf-8")
    assert result.exit_code == 2 and "changed" in result.stderr and "--data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
