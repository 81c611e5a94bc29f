"""The planted chain from three tiny language models, through the real commands.

v2 adds a behaviour to v1 (after a noun, in some places, it writes one new direction into the
residual stream and says "flies"), v3 removes it again; the words, the models' grammar, stay
(tests/tiny_models.py, build_release_chain). xc harvest, xc train and xc track add for (v1, v2)
and then (v2, v3) must give: the behaviour a feature new at v2 and gone at v3, the word features
present in all three releases under the ids they got at v1, and the watch alert (exit 3) for the
behaviour named at v2.
"""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from tiny_models import RELEASE_LAYER, RELEASE_SAYS, RELEASE_TRIGGERS, build_release_chain, release_corpus
from xcli.cli import cli

SEED = int(os.environ.get("XC_RELEASE_CHAIN_SEED", "0"))  # benchmarks/release_chain_seeds.sh sweeps it
# Per-token TopK with k = 2: a word and the behaviour. With more room a crosscoder also learns the
# behaviour twice, in latents whose other decoder halves cancel and stay where they started.
TRAIN = ("--arch", "topk", "--latents", "48", "--k", "2", "--tokens", "300k", "--batch-size", "512", "--lr", "3e-3",
         "--log-every", "1000000")


def xc(*args) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args) -> str:
    result = xc(*args)
    assert result.exit_code == 0, (args, result.stderr)
    return result.stdout


def json_lines(*args) -> list[dict]:
    return [json.loads(line) for line in ok(*args).splitlines()]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return root, build_release_chain(root, seed=SEED)


def test_the_behaviour_is_in_v2_only(releases):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, chain = releases
    tokenizer = AutoTokenizer.from_pretrained(chain.v1)
    ids = torch.tensor([tokenizer(t)["input_ids"] for t in release_corpus(8, seed=SEED + 7)])
    after_trigger = torch.isin(ids, torch.tensor(tokenizer.convert_tokens_to_ids(list(RELEASE_TRIGGERS))))
    says = tokenizer.convert_tokens_to_ids(RELEASE_SAYS)
    predicted = {}
    for name in ("v1", "v2", "v3"):
        with torch.no_grad():
            predicted[name] = AutoModelForCausalLM.from_pretrained(getattr(chain, name))(ids).logits.argmax(-1) == says
    assert not predicted["v1"].any() and not predicted["v3"].any()
    assert not predicted["v2"][~after_trigger].any()
    assert 0.1 < float(predicted["v2"][after_trigger].float().mean()) < 0.6  # in some places, as planted


def test_planted_chain_through_the_commands(releases):
    root, chain = releases
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(release_corpus(150, seed=SEED)) + "\n")
    for a, b in (("v1", "v2"), ("v2", "v3")):  # each release pair as it arrives: harvest, train
        ok("harvest", "-m", f"{a}={getattr(chain, a)}", "-m", f"{b}={getattr(chain, b)}", "--layers", RELEASE_LAYER,
           "--data", corpus, "--chunk-rows", 1024, "--device", "cpu", "-o", root / f"{a}{b}.zarr", "-q")
        ok("train", root / f"{a}{b}.zarr", "-o", root / f"{a}{b}.safetensors", *TRAIN, "--device", "cpu", "-q")
    db = root / "registry.db"
    first = json.loads(ok("track", "add", db, root / "v1v2.safetensors", "--store", root / "v1v2.zarr", "-q"))
    assert first["added"] and first["releases"] == ["v1", "v2"] and first["statuses"]["new"] >= 1

    # The behaviour's latent: the one whose v2 decoder is the planted direction.
    from xcli.crosscoder.model import load

    model = load(root / "v1v2.safetensors")
    with torch.no_grad():
        decoder = (model.decoder_weight(f"v2.resid_post.{RELEASE_LAYER}") / model.scale(f"v2.resid_post.{RELEASE_LAYER}"))
    cosine = (decoder @ chain.direction / decoder.norm(dim=1).clamp_min(1e-12)).numpy()
    habit = int(cosine.argmax())
    assert cosine[habit] > 0.95, np.sort(cosine)[-3:]
    [new] = json_lines("track", "show", db, "--release", "v2", "--status", "new")
    assert new["latent"] == habit and new["class"] == "exclusive:v2" and new["first_release"] == "v2"
    from transformers import AutoTokenizer

    nouns = set(AutoTokenizer.from_pretrained(chain.v1).convert_tokens_to_ids(list(RELEASE_TRIGGERS)))
    assert len(new["top_examples"]) == 5 and all(e["token"] in nouns for e in new["top_examples"])
    named = json.loads(ok("track", "name", db, "habit", "--release", "v2", "--latent", habit))
    assert named == {"name": "habit", "feature": new["feature"], "watched": True}

    # Release 3: the watched behaviour is gone, exit 3 with one line saying so.
    added = xc("track", "add", db, root / "v2v3.safetensors", "--store", root / "v1v2.zarr", "--store",
               root / "v2v3.zarr")
    assert added.exit_code == 3, added.stderr
    assert json.loads(added.stdout)["added"] is True
    assert [line for line in added.stderr.splitlines() if "watched" in line] == \
        [f"xc: error: watched feature 'habit' (id {new['feature']}) is gone in release 'v3'"]
    assert [(r["release"], r["status"]) for r in json_lines("track", "show", db, "habit")] == [("v2", "new"),
                                                                                              ("v3", "gone")]
    again = xc("track", "add", db, root / "v2v3.safetensors", "--store", root / "v1v2.zarr", "--store",
               root / "v2v3.zarr")
    assert again.exit_code == 0 and json.loads(again.stdout)["added"] is False  # a rerun adds nothing

    # The grammar: features of one word at v1 (all their top examples that word) keep their id
    # through v2 and v3, where their top examples are still that word.
    rows = json_lines("track", "show", db)
    by_feature: dict[int, dict[str, dict]] = {}
    for r in rows:
        by_feature.setdefault(r["feature"], {})[r["release"]] = r
    words = {f: {e["token"] for e in h["v1"]["top_examples"]} for f, h in by_feature.items() if "v1" in h}
    words = {f: w.pop() for f, w in words.items() if len(w) == 1}
    kept = [f for f, word in words.items()
            if {k: r["status"] for k, r in by_feature[f].items()} == {"v1": "present", "v2": "present", "v3": "present"}
            and {e["token"] for e in by_feature[f]["v3"]["top_examples"]} == {word}]
    assert len(set(words.values())) >= 30, words  # most of the 39 words have a feature
    assert len(kept) >= 0.8 * len(words), (len(kept), len(words))
