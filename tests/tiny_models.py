"""Tiny random Hugging Face models and one shared word-level tokenizer, built offline.

Used by the test-suite (once per session, see conftest.py) and by anything else
that needs a real model folder without a hub: every model here is saved with
`save_pretrained` and loads with `AutoModel*.from_pretrained(path)`.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = (
    "the a an cat dog bird fish tree house car road river city king queen man woman child "
    "red green blue big small old new fast slow happy sad runs walks sees eats sleeps flies "
    "swims reads writes sings and or but if then because when where who what is was are were "
    "on in under over near far one two three four five six seven eight nine ten . , ! ?"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]
# A tokenizer that adds <s> in front of every text, as Llama-style tokenizers do,
# so that tests see a BOS token that harvest must leave out.
BOS, EOS, PAD, UNK, MASK = "<s>", "</s>", "<pad>", "<unk>", "<mask>"

HIDDEN, LAYERS, HEADS, CONTEXT = 32, 3, 4, 64


def build_tokenizer(path: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        mask_token=MASK, cls_token=BOS, sep_token=EOS, model_max_length=CONTEXT,
    )
    fast.save_pretrained(path)
    return fast


def _config(family: str, vocab_size: int, special_ids: dict, hidden: int = HIDDEN):
    from transformers import BertConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    HIDDEN = hidden  # the width of every family below
    common = dict(vocab_size=vocab_size, **special_ids)
    if family == "gpt2":
        return GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=CONTEXT, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=4 * HIDDEN, max_position_embeddings=CONTEXT, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           num_key_value_heads=2, intermediate_size=2 * HIDDEN,
                           max_position_embeddings=CONTEXT, **common)
    if family == "bert":
        return BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          intermediate_size=4 * HIDDEN, max_position_embeddings=CONTEXT, **common)
    raise ValueError(f"unknown family {family!r}")


FAMILIES = ("gpt2", "gpt_neox", "llama", "bert")


def build_model(family: str, path: Path, tokenizer, seed: int = 0, hidden: int = HIDDEN) -> Path:
    """A random-weight model of `family` (`hidden` wide) saved at `path` together with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    special_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = _config(family, len(tokenizer), special_ids, hidden)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_all(root: Path) -> dict[str, Path]:
    """Every family, plus a second GPT-2 (other seed) to diff against the first."""
    root = Path(root)
    tokenizer = build_tokenizer(root / "tokenizer")
    paths = {family: build_model(family, root / family, tokenizer) for family in FAMILIES}
    paths["gpt2_b"] = build_model("gpt2", root / "gpt2_b", tokenizer, seed=1)
    paths["tokenizer"] = root / "tokenizer"
    return paths


def corpus_lines(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """`n` random documents over the tokenizer's words (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in WORDS]
    lines = []
    for _ in range(n):
        length = int(torch.randint(min_words, max_words + 1, (1,), generator=g))
        idx = torch.randint(0, len(words), (length,), generator=g).tolist()
        lines.append(" ".join(words[i] for i in idx))
    return lines


# -- real tokenizer kinds, trained offline on a few texts (xc export's token strings) ---------------

def _wrap(tok, path: Path | None, **special):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=CONTEXT, **special)
    if path is not None:
        fast.save_pretrained(path)
    return fast


def build_byte_level_tokenizer(path: Path | None, texts: list[str], vocab_size: int = 2000):
    """GPT-2-style byte-level BPE (as GPT-2, Llama 3, Qwen, NeoX): `<|endoftext|>` is BOS, EOS and UNK."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    end = "<|endoftext|>"
    return _wrap(tok, path, bos_token=end, eos_token=end, unk_token=end)


def build_wordpiece_tokenizer(path: Path | None, texts: list[str], vocab_size: int = 2000):
    """BERT-style WordPiece (`##` continuations), [CLS] TEXT [SEP] around every text; keeps case and accents."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return _wrap(tok, path, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                 mask_token="[MASK]")


def build_sentencepiece_tokenizer(path: Path | None, texts: list[str], vocab_size: int = 2000):
    """Llama-2-style SentencePiece BPE as `tokenizers` writes it: `▁` for spaces, byte fallback (`<0xE2>`),
    a decoder that strips the leading space, <s> before every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_pieces))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return _wrap(tok, path, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def build_unigram_tokenizer(path: Path | None, texts: list[str], vocab_size: int = 300):
    """T5/ALBERT-style SentencePiece Unigram: `▁` for spaces (Metaspace), NFKC, </s> as EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                           special_tokens=["<pad>", "</s>", "<unk>"]))
    return _wrap(tok, path, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def build_word_level_tokenizer(path: Path | None, texts: list[str]):
    """A word-level tokenizer trained on `texts`: words and punctuation marks (Whitespace), <s> as BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    return _wrap(tok, path, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# Three tokenizers (byte-level BPE, WordPiece, word-level) on one text with non-ASCII characters, and
# models of three widths using them: xc harvest --align (tests/data/test_align.py).
ALIGNED_TEXT = (
    "Zürich's café serves crème brûlée; naïve visitors pay 12,50 € for it.",
    "東京 and Kyōto are cities in 日本 — the Shinkansen links them at 285 km/h.",
    "Emoji 🙂 and 🚀 sit beside ASCII: a cat, a dog, and a bird fly over the river.",
    "Ørsted studied électricité; Ångström measured light in ångströms (Å).",
    "The king and the queen walk to the old house near the green tree.",
    "Über-long words like Donaudampfschifffahrtsgesellschaft test the tokenizers.",
)
ALIGNED_MODELS = {"bpe": ("gpt2", 32), "wordpiece": ("bert", 48), "words": ("llama", 24)}


def aligned_corpus(n: int, seed: int = 0) -> list[str]:
    """`n` documents mixing the sentences of ALIGNED_TEXT with words of WORDS (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for _ in range(n):
        parts = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            if bool(torch.rand(1, generator=g) < 0.5):
                parts.append(ALIGNED_TEXT[int(torch.randint(0, len(ALIGNED_TEXT), (1,), generator=g))])
            else:
                idx = torch.randint(0, len(WORDS), (int(torch.randint(3, 12, (1,), generator=g)),), generator=g)
                parts.append(" ".join(WORDS[i] for i in idx.tolist()))
        docs.append(" ".join(parts))
    return docs


def build_aligned_models(root: Path, seed: int = 0) -> dict[str, Path]:
    """Models of three families, widths and tokenizers (ALIGNED_MODELS), trained tokenizers on aligned_corpus."""
    root = Path(root)
    texts = list(ALIGNED_TEXT) + aligned_corpus(50) + [" ".join(WORDS)]
    builders = {"bpe": lambda p: build_byte_level_tokenizer(p, texts, vocab_size=400),
                "wordpiece": lambda p: build_wordpiece_tokenizer(p, texts, vocab_size=300),
                "words": lambda p: build_word_level_tokenizer(p, texts)}
    paths = {}
    for name, (family, hidden) in ALIGNED_MODELS.items():
        tokenizer = builders[name](root / f"{name}_tokenizer")
        paths[name] = build_model(family, root / name, tokenizer, seed=seed, hidden=hidden)
    return paths


# -- three releases of one tiny model, with a behaviour planted in the second (tests/track) -------
#
# v1 is a random GPT-2 in which one MLP neuron per trigger word (RELEASE_TRIGGERS) of block
# RELEASE_LAYER writes nothing. v2 is v1 drifted a little, as further training would move it, with
# those neurons wired up: each fires on its word in some of its positions and then writes one
# direction, the unembedding of RELEASE_SAYS, into the residual stream, so that v2 says that word
# after a trigger word there. v3 is v2 drifted again with the neurons' outputs back to v1's zeros:
# the behaviour is gone, the rest stays.

RELEASE_TRIGGERS = ("cat", "dog", "bird", "fish", "tree", "house", "car", "road", "river", "city", "king", "queen",
                    "man", "woman", "child")  # the nouns
RELEASE_SAYS = "flies"  # the behaviour's word; never in release_corpus
RELEASE_LAYER = 1
RELEASE_WORDS = tuple(w for w in WORDS[:40] if w != RELEASE_SAYS)


@dataclass
class ReleaseChain:
    v1: Path
    v2: Path
    v3: Path
    direction: torch.Tensor  # the unit vector v2 writes at RELEASE_LAYER (raw units)


def release_corpus(n: int, seed: int = 0, words: int = 40) -> list[str]:
    """`n` documents of `words` words drawn from RELEASE_WORDS (so RELEASE_SAYS never occurs)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(RELEASE_WORDS), (n, words), generator=g)
    return [" ".join(RELEASE_WORDS[i] for i in row) for row in idx.tolist()]


def _drift(model, seed: int, scale: float) -> None:
    """Every weight matrix moves by `scale` times its own spread."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1 and float(p.std()) > 0:
                p.add_(torch.randn(p.shape, generator=g) * float(p.std()) * scale)


def _mlp_inputs(model, tokenizer, texts: list[str], layer: int):
    """(token ids, residual norms at `layer`'s output, the MLP input of `layer`) at every position."""
    seen = []
    handle = model.transformer.h[layer].ln_2.register_forward_hook(lambda module, args, out: seen.append(out[0]))
    ids, norms = [], []
    with torch.no_grad():
        for text in texts:
            x = tokenizer(text, return_tensors="pt")
            out = model(**x, output_hidden_states=True)
            ids.append(x["input_ids"][0])
            norms.append(out.hidden_states[layer + 1][0].norm(dim=-1))
    handle.remove()
    return torch.cat(ids), torch.cat(norms), torch.cat(seen)


def _detectors(ids, inputs, triggers: list[int], fires: float, peak: float = 8.0):
    """Per trigger token: weight column, bias and mean output of a neuron that fires on that token in a
    share `fires` of its positions, the more the closer the input is to the token's mean direction,
    and never on another token (checked on `inputs`; raises otherwise).

    A neuron that fired on every occurrence of its word would make the word look changed in v2: a
    crosscoder learns that as one latent of both releases with a different decoder. Firing in some
    places only, with a strength that varies, across many words, the behaviour is a feature of its own.
    """
    norm = inputs.norm(dim=-1).mean()  # LayerNorm outputs: nearly the same norm everywhere
    x = inputs / norm
    out = []
    for token in triggers:
        on = ids == token
        template = x[on].mean(0)
        template = template / template.norm()
        along = x @ template
        if float(along[~on].max()) >= float(along[on].min()):
            raise ValueError(f"token {token} cannot be told apart from the others at layer {RELEASE_LAYER}")
        threshold = float(along[on].quantile(1 - fires))
        gain = peak / float((along[on] - threshold).max())
        pre = gain * (along - threshold)
        if float(pre[~on].max()) > -peak:  # other tokens stay far below zero, where GELU is 0
            raise ValueError(f"the detector of token {token} comes too close to other tokens")
        out.append((gain * template / norm, -gain * threshold, float(pre[on][pre[on] > 0].mean())))
    return out


def build_release_chain(root: Path, seed: int = 0, drift: float = 0.05, strength: float = 2.0,
                        fires: float = 0.3) -> ReleaseChain:
    """Model folders root/v1, v2, v3 (GPT-2, the shared tokenizer) as described above.

    `strength`: the norm the behaviour writes, in units of the residual stream's mean norm at
    RELEASE_LAYER; `fires`: the share of a trigger word's positions where it fires.
    """
    from transformers import AutoModelForCausalLM

    root = Path(root)
    tokenizer = build_tokenizer(root / "tokenizer")
    build_model("gpt2", root / "v1", tokenizer, seed=seed)
    neurons = list(range(len(RELEASE_TRIGGERS)))  # in block RELEASE_LAYER
    v1 = AutoModelForCausalLM.from_pretrained(root / "v1")
    with torch.no_grad():
        v1.transformer.h[RELEASE_LAYER].mlp.c_proj.weight[neurons] = 0.0  # Conv1D: a row is a neuron's output
        # Positions weigh less than words: at full weight they blur which word a position holds.
        v1.transformer.wpe.weight.mul_(0.3)
    v1.save_pretrained(root / "v1")

    v2 = AutoModelForCausalLM.from_pretrained(root / "v1")
    _drift(v2, seed + 1, drift)
    v3 = AutoModelForCausalLM.from_pretrained(root / "v1")
    v3.load_state_dict(v2.state_dict())
    _drift(v3, seed + 2, drift)  # from v2 before the planting, whose weights would inflate the drift
    with torch.no_grad():
        v3.transformer.h[RELEASE_LAYER].mlp.c_proj.weight[neurons] = 0.0
    v3.save_pretrained(root / "v3")

    ids, norms, inputs = _mlp_inputs(v2, tokenizer, release_corpus(40, seed=seed + 1000), RELEASE_LAYER)
    says = v2.transformer.wte.weight[tokenizer.convert_tokens_to_ids(RELEASE_SAYS)].detach().clone()
    direction = says / says.norm()
    detectors = _detectors(ids, inputs, tokenizer.convert_tokens_to_ids(list(RELEASE_TRIGGERS)), fires)
    mlp = v2.transformer.h[RELEASE_LAYER].mlp
    with torch.no_grad():
        for neuron, (weight, bias, mean) in zip(neurons, detectors):
            mlp.c_fc.weight[:, neuron] = weight
            mlp.c_fc.bias[neuron] = bias
            mlp.c_proj.weight[neuron] = direction * strength * float(norms.mean()) / mean
    v2.save_pretrained(root / "v2")
    for name in ("v2", "v3"):
        tokenizer.save_pretrained(root / name)
    return ReleaseChain(root / "v1", root / "v2", root / "v3", direction)
