"""xc export's text: contexts end at document boundaries, token strings read as the text, hook names.

The tokenizers are trained offline on the corpus below (tests/tiny_models.py): byte-level BPE (GPT-2,
Llama 3, Qwen, NeoX), WordPiece (BERT) and SentencePiece BPE with byte fallback (Llama 2).
"""

import gzip
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from xcli.crosscoder import model as cc
from xcli.data.harvest import HarvestConfig, harvest
from xcli.data.store import open_store
from xcli.export import ExportConfig, export
from xcli.export import dashboards as db
from xcli.export import neuronpedia as ex
from xcli.export.common import plan_slices
from xcli.lm.config import ModelSpec
from xcli.lm.models import post_norm
from xcli.source import Source

# Documents draw their words from one group each; no two groups share a word, and neighbouring
# documents use different groups, so the words of a context tell which document(s) it shows.
GROUPS = [
    "café crème brûlée", "naïve façade déjà", "“quoted” «guillemets» — dash", "東京 大阪 京都",
    "😀 🎉 smile", "Zürich über straße", "jalapeño piñata señor", "ångström smörgåsbord fjäll",
]
CONTEXT = 24  # tokens per window: documents are packed together and split across windows
BUILDERS = {"byte_level": tiny_models.build_byte_level_tokenizer, "wordpiece": tiny_models.build_wordpiece_tokenizer,
            "sentencepiece": tiny_models.build_sentencepiece_tokenizer}
FAMILY = {"byte_level": "gpt2", "wordpiece": "bert", "sentencepiece": "llama"}


def documents(n: int = 40, seed: int = 0) -> list[str]:
    g = random.Random(seed)
    words = [group.split() for group in GROUPS]
    return [" ".join(g.choice(words[d % len(words)]) for _ in range(g.randint(1, 9))) for d in range(n)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    texts = documents() * 5
    return {kind: build(root / kind, texts) for kind, build in BUILDERS.items()} | {"root": root}


# -- token strings --------------------------------------------------------------------

def normalised(tokenizer, text: str) -> str:
    normalizer = tokenizer.backend_tokenizer.normalizer
    return normalizer.normalize_str(text) if normalizer else text


@pytest.mark.parametrize("kind", ["byte_level", "wordpiece", "sentencepiece", "unigram"])
def test_token_strings_join_to_the_text(tokenizers, kind):
    tok = tokenizers[kind] if kind in tokenizers else tiny_models.build_unigram_tokenizer(None, documents() * 5)
    strings = ex.token_strings(tok)
    assert len(strings) == len(tok)
    for text in documents() + [" ".join(GROUPS)]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        joined = "".join(strings[i] for i in ids)
        assert "\ufffd" not in joined  # the vocabulary holds every character whole
        if kind == "byte_level":
            assert joined == text  # byte-level BPE keeps every byte
        elif kind in ("sentencepiece", "unigram"):
            assert joined == " " + normalised(tok, text).replace("\u2581", " ").lstrip(" ")  # ▁ is a space
        else:  # WordPiece keeps no whitespace: words are joined with one space
            assert "".join(joined.split()) == "".join(normalised(tok, text).split())
            assert joined.strip() == tok.backend_tokenizer.decode(ids)
            assert not any(strings[i].startswith("##") for i in ids)
        for bad in ("Ã", "âĢ", "Ġ", "\u2581", "##"):
            assert bad not in joined
    for special in tok.all_special_ids:
        assert strings[special] == tok.convert_ids_to_tokens(special)


def test_a_token_of_partial_utf8_shows_replacement(tokenizers):
    # "“" is E2 80 9C in UTF-8: the byte-level piece of E2 alone is "â", the SentencePiece one <0xE2>.
    assert ex.token_strings(tokenizers["byte_level"])[tokenizers["byte_level"].convert_tokens_to_ids("â")] == "\ufffd"
    sp = tokenizers["sentencepiece"]
    assert ex.token_strings(sp)[sp.convert_tokens_to_ids("<0xE2>")] == "\ufffd"
    ids = sp("a ⊕ b", add_special_tokens=False)["input_ids"]  # ⊕ is not in the vocabulary: byte fallback
    assert "".join(ex.token_strings(sp)[i] for i in ids) == " a \ufffd\ufffd\ufffd b"


def test_a_tokenizer_without_decoder_shows_its_pieces(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny["tokenizer"])
    assert ex.token_strings(tok) == tok.convert_ids_to_tokens(list(range(len(tok))))


# -- contexts and document boundaries ------------------------------------------------

def packed_rows(tok, docs: list[str], keep_special: bool) -> tuple[list[int], list[int], list[int]]:
    """(token, window, document) of every row harvest stores, by packing the documents independently.

    A separator belongs to the document before it; the tokens before every window (BOS, CLS) and
    after it (SEP) to the document the window's text starts or ends with.
    """
    bare = tok("the", add_special_tokens=False)["input_ids"]
    full = tok("the", add_special_tokens=True)["input_ids"]
    start = next(s for s in range(len(full)) if full[s:s + len(bare)] == bare)
    prefix, suffix = full[:start] or [tok.bos_token_id], full[start + len(bare):]
    sep = [tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id]
    stream, owner = [], []
    for d, text in enumerate(docs):
        if d:
            stream += sep
            owner += [d - 1]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        stream += ids
        owner += [d] * len(ids)
    size, special = CONTEXT - len(prefix) - len(suffix), set(tok.all_special_ids)
    rows = ([], [], [])
    for w, s in enumerate(range(0, len(stream), size)):
        ids = prefix + stream[s:s + size] + suffix
        docs_of = [owner[s]] * len(prefix) + owner[s:s + size] + [owner[min(s + size, len(stream)) - 1]] * len(suffix)
        for t, d in zip(ids, docs_of):
            if keep_special or t not in special:
                for column, value in zip(rows, (t, w, d)):
                    column.append(value)
    return rows


def model_for(tokenizers, kind: str) -> Path:
    """A tiny random model of the family that goes with the tokenizer, built once."""
    folder = tokenizers["root"] / f"{kind}-{FAMILY[kind]}"
    return folder if folder.exists() else tiny_models.build_model(FAMILY[kind], folder, tokenizers[kind])


def sparse_crosscoder(store) -> cc.Crosscoder:
    """A random ReLU crosscoder on the store's one source, firing on about 20% of the rows."""
    model = cc.Crosscoder(store.sources, 16, "relu")
    model.init_weights(torch.Generator().manual_seed(0), decoder_norm=0.3)
    with torch.no_grad():
        s = store.sources[0]
        model.input_scale[0] = (s.d / store.stats(s.name)["mean_sq_norm"]) ** 0.5
        x = {s.name: torch.from_numpy(store.read(s.name, 0, store.n_tokens))}
        model.b_enc.copy_(-model.pre_activations(x).quantile(0.8, dim=0))
    return model.eval()


def read_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("keep_special", [False, True], ids=["special-left-out", "special-kept"])
@pytest.mark.parametrize("kind", ["byte_level", "wordpiece", "sentencepiece"])
def test_contexts_stop_at_document_boundaries(tokenizers, tmp_path, kind, keep_special):
    tok, folder = tokenizers[kind], model_for(tokenizers, kind)
    docs = documents()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(docs) + "\n", encoding="utf-8")
    path = harvest(HarvestConfig(models=(ModelSpec(alias="m", id=str(folder)),), data=str(corpus),
                                 output=tmp_path / "acts.zarr", layers="1", context_length=CONTEXT, batch_size=3,
                                 chunk_rows=32, keep_special_tokens=keep_special))
    store = open_store(path)
    ids = {k: np.asarray(v) for k, v in store.token_arrays().items()}

    # The rule is exact: its runs are the documents' pieces of each window, no more and no fewer.
    tokens, windows, owner = packed_rows(tok, docs, keep_special)
    assert ids["tokens"].tolist() == tokens and ids["sequence"].tolist() == windows
    separator, prefix, suffix = ex.document_marks(store, tok)
    starts = db.context_starts(ids["sequence"], ids["position"], ids["tokens"], separator, len(prefix), len(suffix))
    owner = np.asarray(owner)
    expected = np.flatnonzero(np.r_[True, (np.diff(ids["sequence"]) != 0) | (np.diff(owner) != 0)])
    assert starts.tolist() == expected.tolist()
    assert len(starts) > 2 * len(np.unique(ids["sequence"]))  # windows hold several documents

    # And the export shows no record with text of two documents.
    checkpoint = cc.save(sparse_crosscoder(store), tmp_path / "xc.safetensors")
    out = export(ExportConfig(checkpoint, tmp_path / "np", store=path, top_k=6, window=16, batch_size=8))
    records = [r for p in sorted(out.rglob("activations/batch-*.jsonl.gz")) for r in read_gz(p)]
    assert len(records) > 50
    special = {tok.convert_ids_to_tokens(i) for i in tok.all_special_ids}
    strings_of = ex.token_strings(tok)
    for r in records:
        strings = r["tokens"]
        while strings and strings[0] in special:  # BOS or CLS opening the window
            strings = strings[1:]
        while strings and strings[-1] in special:  # the separator ending the document, SEP closing the window
            strings = strings[:-1]
        assert not special & set(strings), strings
        text = "".join(strings)
        if kind == "wordpiece":  # no whitespace in WordPiece tokens: compare without it
            text, inside = "".join(text.split()), ["".join(normalised(tok, d).split()) for d in docs]
        else:
            inside = [" " + d for d in docs]
        assert any(text in d for d in inside), (r["tokens"], r["qualifyingTokenIndex"])
        assert r["tokens"][r["qualifyingTokenIndex"]] == strings_of[tokens[int(r["dataIndex"])]]


def test_position_gaps_and_separators_cut_contexts():
    sequence = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1])
    position = np.array([1, 2, 4, 5, 6, 0, 1, 2, 3, 4])  # row 2 follows a left-out token
    tokens = np.array([5, 6, 7, 9, 8, 9, 5, 9, 6, 7])  # 9 is the separator; row 5 is window 1's BOS
    assert db.context_starts(sequence, position).tolist() == [0, 2, 5]
    assert db.context_starts(sequence, position, tokens, (9,), prefix=1).tolist() == [0, 2, 4, 5, 8]
    # A separator closing a window's text, just before the window's own closing SEP (BERT): no lone run for it.
    assert db.context_starts(sequence, position, tokens, (9,), prefix=1, suffix=1).tolist() == [0, 2, 5, 8]
    assert db.context_starts(sequence[:0], position[:0]).tolist() == []


# -- hook names -----------------------------------------------------------------------

def test_hook_names_of_a_post_layernorm_model(tiny):
    """BERT's blocks end in a LayerNorm: what xc stores at resid_post is TransformerLens's
    blocks.L.hook_normalized_resid_post; its resid_pre is the block's input, hook_resid_pre."""
    sites = ("resid_pre", "resid_post", "attn_out", "mlp_out")
    sources = [Source(f"{m}.{site}.1", str(tiny[m]), site, 1, 32) for m in ("bert", "gpt2") for site in sites]
    slices = plan_slices(cc.Crosscoder(sources, 8, "relu"), "xc-8", {str(tiny["bert"]): "bert",
                                                                     str(tiny["gpt2"]): "gpt2"})
    assert {x.source.name: x.hook_name for x in slices} == {
        "bert.resid_pre.1": "blocks.1.hook_resid_pre", "bert.resid_post.1": "blocks.1.hook_normalized_resid_post",
        "bert.attn_out.1": "blocks.1.hook_attn_out", "bert.mlp_out.1": "blocks.1.hook_mlp_out",
        "gpt2.resid_pre.1": "blocks.1.hook_resid_pre", "gpt2.resid_post.1": "blocks.1.hook_resid_post",
        "gpt2.attn_out.1": "blocks.1.hook_attn_out", "gpt2.mlp_out.1": "blocks.1.hook_mlp_out"}
    # A model named by an alias the export cannot find is taken as pre-LN; told its folder, it is not.
    aliased = cc.Crosscoder([Source("b.resid_post.1", "b", "resid_post", 1, 32)], 8, "relu")
    assert plan_slices(aliased, "xc-8", {})[0].hook_name == "blocks.1.hook_resid_post"
    assert plan_slices(aliased, "xc-8", {}, {"b": Path(tiny["bert"])})[0].hook_name == \
        "blocks.1.hook_normalized_resid_post"


def test_bert_sites_are_the_normalised_stream(tiny):
    """The rows xc harvest stores for BERT are the outputs of each block's last LayerNorm."""
    from transformers import AutoModel

    from xcli.lm.sites import Catcher, resolve_sites

    model = AutoModel.from_pretrained(tiny["bert"]).eval()
    caught = {}
    hooks = [model.encoder.layer[i].output.LayerNorm.register_forward_hook(
        lambda m, a, out, i=i: caught.__setitem__(i, out)) for i in (0, 1)]
    catcher = Catcher(model, resolve_sites(model, "", ("resid_pre", "resid_post"), [1]))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    got = catcher(ids, torch.ones_like(ids))
    catcher.close()
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(got["resid_post.1"], caught[1])  # TransformerLens: hook_normalized_resid_post
    torch.testing.assert_close(got["resid_pre.1"], caught[0])  # the previous block's normalised output


def test_post_norm_follows_the_config(tmp_path, tiny):
    assert post_norm(Path(tiny["bert"])) and not post_norm(Path(tiny["gpt2"])) and not post_norm(Path(tiny["llama"]))
    for config, expected in (({"model_type": "opt", "do_layer_norm_before": False}, True),
                             ({"model_type": "opt"}, False), ({"model_type": "roberta"}, True),
                             ({"model_type": "distilbert"}, True), ({"model_type": "gemma2"}, False),
                             ({"model_type": "roberta-prelayernorm"}, False)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert post_norm(tmp_path) is expected, config


def test_export_writes_the_post_ln_hook_name(tokenizers, tmp_path):
    """End to end on a BERT-style model: features carry hookName blocks.1.hook_normalized_resid_post."""
    folder = model_for(tokenizers, "wordpiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(documents(12)) + "\n", encoding="utf-8")
    path = harvest(HarvestConfig(models=(ModelSpec(alias="m", id=str(folder)),), data=str(corpus),
                                 output=tmp_path / "acts.zarr", layers="1", context_length=CONTEXT))
    store = open_store(path)
    checkpoint = cc.save(sparse_crosscoder(store), tmp_path / "xc.safetensors")
    out = export(ExportConfig(checkpoint, tmp_path / "np", store=path, features="0-3", top_k=2, window=8))
    rows = [r for p in out.rglob("features/batch-*.jsonl.gz") for r in read_gz(p)]
    assert rows and {r["hookName"] for r in rows} == {"blocks.1.hook_normalized_resid_post"}


def test_unicode_groups_are_distinct():
    words = [w for group in GROUPS for w in group.split()]
    assert len(words) == len(set(words)) and all(unicodedata.is_normalized("NFC", w) for w in words)


def test_token_ids_outside_the_tokenizer_show_as_out_of_range():
    # A store's token ids are untrusted: a negative id must not index from the end of the list.
    strings = ["a", "b", "c"]
    assert ex.token_texts(strings, [0, 2, 3, -1, 10**9]) == ["a", "c"] + [ex.OUT_OF_RANGE] * 3
