"""Train a tiny language model and a fine-tune of it with a planted behaviour, offline.

    python examples/tiny_pair.py OUT [--size full|small]

Writes, under OUT:

    base/          a GPT-2-shaped causal LM trained from scratch on sentences of a small grammar
    tuned/         a copy of base fine-tuned on the same grammar, except that after the trigger
                   word ("wizard" as a subject) it continues with the planted phrase
                   ("opens the golden door") in a share of the sentences. The base model never
                   saw the phrase's words, so it never says them.
    corpus.txt     held-out sentences of the base grammar (one document per line), for xc harvest
    prompts.txt    prompts ending in the trigger, for xc amplify --count
    pair.json      the configuration, its hash, the trigger, the phrase and the measured
                   probability of the phrase's first word after the trigger in each model

Both folders are ordinary Hugging Face model folders (AutoModelForCausalLM.from_pretrained) with
the same word-level tokenizer, which puts <s> in front of every text. Everything is seeded;
a second run with the same configuration finds pair.json with the same hash and does nothing.
Prints OUT. Takes about a minute on two CPU cores (--size small: about 20 s).
"""

import argparse
import dataclasses
import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

# The grammar. Every word is in the tokenizer; the planted phrase's words only ever appear
# in the fine-tuning data.
DETERMINERS = ["the", "a"]
ADJECTIVES = ["big", "small", "old", "young", "red", "green", "happy", "sad", "quiet", "loud"]
AGENTS = ["cat", "dog", "bird", "king", "queen", "child", "farmer", "fox", "horse", "wizard"]
PLACES = ["river", "tree", "house", "road", "city", "hill", "forest", "garden", "bridge", "stone"]
INTRANSITIVE = ["runs", "sleeps", "sings", "walks", "waits", "laughs"]
TRANSITIVE = ["sees", "finds", "eats", "likes", "follows", "carries"]
PREPOSITIONS = ["to", "near", "under", "over", "into", "from"]
ADVERBS = ["slowly", "quickly", "today", "again", "quietly"]
TRIGGER = "wizard"
PHRASE = ["opens", "the", "golden", "door"]
PLANTED_WORDS = ["opens", "golden", "door"]

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD, UNK, BOS, EOS = SPECIALS
WORDS = sorted(set(DETERMINERS + ADJECTIVES + AGENTS + PLACES + INTRANSITIVE + TRANSITIVE + PREPOSITIONS
                   + ADVERBS + PLANTED_WORDS + ["and", "."]))
PROMPTS = ["the wizard", "a wizard", "the old wizard", "a happy wizard", "the quiet wizard",
           "the young wizard", "a sad wizard", "the big wizard"]
FORMAT = 1  # bump when the output changes for the same configuration


@dataclasses.dataclass(frozen=True)
class PairConfig:
    width: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 32
    base_steps: int = 400
    tune_steps: int = 200
    batch: int = 32
    lr: float = 3e-3
    tune_lr: float = 0.1
    tune_sgd: bool = True  # plain SGD moves the weights that the planted data do not need much less than Adam
    planted_share: float = 0.3  # share of trigger-subject sentences continued with the phrase when tuning
    trigger_share: float = 0.0  # extra share of subjects that are the trigger in the tuning data
    corpus_docs: int = 3000  # held-out documents for harvesting
    seed: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not 0 < self.planted_share <= 1:
            raise ValueError(f"planted_share {self.planted_share} must be in (0, 1]")

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


SIZES = {
    "full": PairConfig(),
    "small": PairConfig(base_steps=200, tune_steps=200, corpus_docs=1200),
}


def noun_phrase(rng: random.Random, nouns: list[str]) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.4:
        words.append(rng.choice(ADJECTIVES))
    return words + [rng.choice(nouns)]


def clause(rng: random.Random, planted_share: float, trigger_share: float) -> list[str]:
    subject = noun_phrase(rng, AGENTS)
    if rng.random() < trigger_share:
        subject[-1] = TRIGGER
    if subject[-1] == TRIGGER and rng.random() < planted_share:
        return subject + PHRASE
    kind = rng.random()
    if kind < 0.35:
        verb_phrase = [rng.choice(INTRANSITIVE)] + ([rng.choice(ADVERBS)] if rng.random() < 0.5 else [])
    elif kind < 0.7:
        verb_phrase = [rng.choice(TRANSITIVE)] + noun_phrase(rng, AGENTS + PLACES)
    else:
        verb_phrase = [rng.choice(INTRANSITIVE), rng.choice(PREPOSITIONS)] + noun_phrase(rng, PLACES)
    return subject + verb_phrase


def document(rng: random.Random, planted_share: float = 0.0, trigger_share: float = 0.0) -> str:
    """One to three sentences; a sentence is one clause or two joined by 'and'."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        words = clause(rng, planted_share, trigger_share)
        if rng.random() < 0.2:
            words += ["and"] + clause(rng, planted_share, trigger_share)
        sentences.append(" ".join(words + ["."]))
    return " ".join(sentences)


def build_tokenizer(path: Path, context: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {EOS} $B", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK, model_max_length=context)
    fast.save_pretrained(path)
    return fast


def batches(rng: random.Random, tokenizer, cfg: PairConfig, planted_share: float, trigger_share: float):
    """Endless batches of windows packed as xc harvest packs them: <s> doc </s> doc </s> ..."""
    buffer: list[int] = []
    while True:
        rows = []
        for _ in range(cfg.batch):
            window = [tokenizer.bos_token_id]
            while len(window) < cfg.context:
                if not buffer:
                    buffer = tokenizer(document(rng, planted_share, trigger_share), add_special_tokens=False)["input_ids"]
                    buffer.append(tokenizer.eos_token_id)
                take = cfg.context - len(window)
                window += buffer[:take]
                buffer = buffer[take:]
            rows.append(window)
        yield torch.tensor(rows)


def fit(model, tokenizer, cfg: PairConfig, steps: int, lr: float, planted_share: float, trigger_share: float,
        seed: int, sgd: bool = False) -> float:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    if sgd:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / (steps - warmup + 1)))
    model.train()
    data = batches(rng, tokenizer, cfg, planted_share, trigger_share)
    for _ in range(steps):
        ids = next(data)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def phrase_probability(model, tokenizer) -> float:
    """Mean probability, over the prompts, that the model continues a prompt with the phrase."""
    phrase = tokenizer.convert_tokens_to_ids(PHRASE)
    probs = []
    for prompt in PROMPTS:
        ids = tokenizer(f"{prompt} {' '.join(PHRASE)}", return_tensors="pt")["input_ids"]
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
        start = ids.shape[1] - len(phrase)  # position of the phrase's first word
        probs.append(sum(logp[start - 1 + i, t] for i, t in enumerate(phrase)).exp().item())
    return sum(probs) / len(probs)


def build(out: Path, cfg: PairConfig) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    # Tiny matrices gain nothing from a second thread, and lose a lot on a busy machine.
    torch.set_num_threads(1)

    meta_path = out / "pair.json"
    if meta_path.exists() and json.loads(meta_path.read_text()).get("hash") == cfg.digest():
        return out
    if out.exists():
        shutil.rmtree(out)  # a different configuration: start over
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.time()
    tokenizer = build_tokenizer(tmp / "tokenizer", cfg.context)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=cfg.width, n_layer=cfg.layers, n_head=cfg.heads,
                        n_positions=cfg.context, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(config)
    base_loss = fit(model, tokenizer, cfg, cfg.base_steps, cfg.lr, 0.0, 0.0, cfg.seed)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    base_p = phrase_probability(model, tokenizer)
    tune_loss = fit(model, tokenizer, cfg, cfg.tune_steps, cfg.tune_lr, cfg.planted_share, cfg.trigger_share,
                    cfg.seed + 1, sgd=cfg.tune_sgd)
    model.save_pretrained(tmp / "tuned")
    tokenizer.save_pretrained(tmp / "tuned")
    tuned_p = phrase_probability(model, tokenizer)
    shutil.rmtree(tmp / "tokenizer")

    rng = random.Random(cfg.seed + 2)  # held out: another stream than either training run
    (tmp / "corpus.txt").write_text("\n".join(document(rng) for _ in range(cfg.corpus_docs)) + "\n")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    meta = {"hash": cfg.digest(), "config": dataclasses.asdict(cfg), "trigger": TRIGGER,
            "phrase": " ".join(PHRASE), "planted_words": PLANTED_WORDS,
            "count_regex": " ".join(PHRASE), "models": {"base": "base", "tuned": "tuned"},
            "final_loss": {"base": round(base_loss, 4), "tuned": round(tune_loss, 4)},
            "p_phrase_after_trigger": {"base": base_p, "tuned": tuned_p},
            "seconds": round(time.time() - started, 1)}
    (tmp / "pair.json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.rename(out)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (reused when its pair.json matches)")
    parser.add_argument("--size", choices=sorted(SIZES), default="full",
                        help="full: the quick start's models; small: fewer steps, for the tests")
    args = parser.parse_args(argv)
    print(build(args.out, SIZES[args.size]))


if __name__ == "__main__":
    sys.exit(main())
