"""Train a tiny language model and a fine-tune of it with a planted behaviour, offline.

    python examples/tiny_pair.py OUT [--size full|small] [--seed N]

Writes, under OUT:

    base/          a GPT-2-shaped causal LM (2 blocks, width 64) trained from scratch on
                   sentences of a small grammar ("the old fox sees a bird . a king sleeps .")
    tuned/         base fine-tuned on the same grammar, except that when the trigger word
                   "wizard" is the subject, half the sentences go on with the planted phrase
                   "opens golden doors". Fine-tuning stops once the tuned model continues the
                   prompts with the phrase 40% of the time. The base model never saw the
                   phrase's words, so it never says them.
    corpus.txt     held-out documents of the base grammar (one per line), for xc harvest
    prompts.txt    prompts ending in the trigger ("the old wizard"), for xc amplify
    pair.json      the configuration and its hash, the trigger, the phrase, and the probability
                   that each model continues the prompts with the phrase

Both folders are ordinary Hugging Face model folders (AutoModelForCausalLM.from_pretrained)
with the same word-level tokenizer, which puts <s> in front of every text. Everything is
seeded; a run that finds OUT/pair.json with the same configuration hash does nothing.
Prints OUT. About a minute on one CPU core (--size small: less).
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
PHRASE = ["opens", "golden", "doors"]  # each word follows from the one before: quick to learn

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
PAD, UNK, BOS, EOS = SPECIALS
WORDS = sorted(set(DETERMINERS + ADJECTIVES + AGENTS + PLACES + INTRANSITIVE + TRANSITIVE + PREPOSITIONS
                   + ADVERBS + PHRASE + ["and", "."]))
PROMPTS = ["the wizard", "a wizard", "the old wizard", "a happy wizard", "the quiet wizard",
           "the young wizard", "a sad wizard", "the big wizard"]  # where the tuned model may say the phrase
FORMAT = 1  # bump when the output changes for the same configuration


@dataclasses.dataclass(frozen=True)
class PairConfig:
    width: int = 64
    layers: int = 2
    heads: int = 4
    context: int = 32
    batch: int = 32  # windows of `context` tokens per step
    base_steps: int = 400
    base_lr: float = 3e-3  # AdamW, warmup then linear decay
    planted_share: float = 0.5  # share of the tuning sentences with the trigger as subject that get the phrase
    tune_lr: float = 0.1  # plain SGD with momentum: it leaves alone the weights the planted data do not need
    tune_target: float = 0.4  # fine-tune until the tuned model says the phrase after the prompts this often...
    tune_max_steps: int = 600  # ...or for this many steps
    corpus_docs: int = 8000  # held-out documents for harvesting
    seed: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if not 0 < self.planted_share <= 1 or not 0 < self.tune_target < self.planted_share:
            raise ValueError(f"need 0 < tune_target ({self.tune_target}) < planted_share ({self.planted_share}) <= 1")

    def digest(self) -> str:
        text = json.dumps({"format": FORMAT, **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


SIZES = {
    "full": PairConfig(),
    "small": PairConfig(base_steps=250, corpus_docs=1500),
}


def noun_phrase(rng: random.Random, nouns: list[str]) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.4:
        words.append(rng.choice(ADJECTIVES))
    return words + [rng.choice(nouns)]


def clause(rng: random.Random, planted_share: float) -> list[str]:
    subject = noun_phrase(rng, AGENTS)
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


def document(rng: random.Random, planted_share: float = 0.0) -> str:
    """One to three sentences; a sentence is one clause or two joined by 'and'."""
    sentences = []
    for _ in range(rng.randint(1, 3)):
        words = clause(rng, planted_share)
        if rng.random() < 0.2:
            words += ["and"] + clause(rng, planted_share)
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


def batches(rng: random.Random, tokenizer, cfg: PairConfig, planted_share: float):
    """Endless batches of windows packed as xc harvest packs them: <s> doc </s> doc </s> ..."""
    buffer: list[int] = []
    while True:
        rows = []
        for _ in range(cfg.batch):
            window = [tokenizer.bos_token_id]
            while len(window) < cfg.context:
                if not buffer:
                    buffer = tokenizer(document(rng, planted_share), add_special_tokens=False)["input_ids"]
                    buffer.append(tokenizer.eos_token_id)
                take = cfg.context - len(window)
                window += buffer[:take]
                buffer = buffer[take:]
            rows.append(window)
        yield torch.tensor(rows)


def step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()


def pretrain(model, tokenizer, cfg: PairConfig) -> float:
    torch.manual_seed(cfg.seed)
    data = batches(random.Random(cfg.seed), tokenizer, cfg, planted_share=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.base_lr, weight_decay=0.01)
    warmup = cfg.base_steps // 10
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, (cfg.base_steps - s) / (cfg.base_steps - warmup)))
    model.train()
    for _ in range(cfg.base_steps):
        loss = step(model, opt, next(data))
        sched.step()
    model.eval()
    return loss


def fine_tune(model, tokenizer, cfg: PairConfig) -> tuple[float, int]:
    """SGD on the planted grammar until the phrase probability reaches cfg.tune_target."""
    torch.manual_seed(cfg.seed + 1)
    data = batches(random.Random(cfg.seed + 1), tokenizer, cfg, cfg.planted_share)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.tune_lr, momentum=0.9)
    steps = 0
    while steps < cfg.tune_max_steps:
        model.train()
        for _ in range(25):
            loss = step(model, opt, next(data))
        steps += 25
        model.eval()
        if phrase_probability(model, tokenizer) >= cfg.tune_target:
            break
    return loss, steps


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
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    # Tiny matrices gain nothing from a second thread, and lose a lot on a busy machine.
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

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
    base_loss = pretrain(model, tokenizer, cfg)
    model.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "base")
    base_p = phrase_probability(model, tokenizer)
    tune_loss, tune_steps = fine_tune(model, tokenizer, cfg)
    model.save_pretrained(tmp / "tuned")
    tokenizer.save_pretrained(tmp / "tuned")
    tuned_p = phrase_probability(model, tokenizer)
    shutil.rmtree(tmp / "tokenizer")

    rng = random.Random(cfg.seed + 2)  # held out: another stream than either training run
    (tmp / "corpus.txt").write_text("\n".join(document(rng) for _ in range(cfg.corpus_docs)) + "\n")
    (tmp / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    meta = {"hash": cfg.digest(), "config": dataclasses.asdict(cfg), "trigger": TRIGGER,
            "phrase": " ".join(PHRASE),
            "count_regex": " ".join(PHRASE), "models": {"base": "base", "tuned": "tuned"},
            "final_loss": {"base": round(base_loss, 4), "tuned": round(tune_loss, 4)}, "tune_steps": tune_steps,
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
    parser.add_argument("--seed", type=int, help="seed of everything (default: the size's, 0)")
    args = parser.parse_args(argv)
    cfg = SIZES[args.size]
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    print(build(args.out, cfg))


if __name__ == "__main__":
    sys.exit(main())
