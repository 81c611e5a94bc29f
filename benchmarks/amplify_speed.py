"""How much does amplification cost against plain generation? Prints tokens/s and ratios.

    python benchmarks/amplify_speed.py [--layers 6] [--width 384] [--vocab 8192] [--batch 8]
                                       [--new-tokens 64] [--repeats 3] [--threads 1]

Three ways to produce the same greedy tokens for a batch of prompts, interleaved and repeated:
  generate   transformers' `model.generate` of the after-model alone (one forward pass per step);
  amplify    `xcli.lm.amplify.amplify_models` with alpha = 1 (two incremental passes per step, KV caches);
  no-cache   the same amplification recomputing both models on the whole prefix at each step
             (logits of the last position only).
The expected cost of amplify is about 2x generate (two models); no-cache grows with length.
Models are random GPT-2s built here (offline), with a word-level tokenizer of --vocab words.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def build(root: Path, layers: int, width: int, vocab: int, context: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 4)])}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    # No EOS anywhere: every method produces exactly --new-tokens tokens per row.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", pad_token="<pad>", unk_token="<unk>")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=width // 64,
                            n_positions=context, bos_token_id=2, eos_token_id=None, pad_token_id=0)
        path = root / f"model{seed}"
        GPT2LMHeadModel(config).eval().save_pretrained(path)
        fast.save_pretrained(path)
        paths.append(path)
    return paths, fast


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from xcli.lm import amplify as amp
    from xcli.lm.models import quiet_transformers

    quiet_transformers()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        (before_path, after_path), tok = build(Path(tmp), args.layers, args.width, args.vocab,
                                               args.prompt_tokens + args.new_tokens + 8)
        g = torch.Generator().manual_seed(0)
        prompts = tuple(" ".join(f"w{int(i)}" for i in torch.randint(0, args.vocab - 4, (args.prompt_tokens - 1,),
                                                                      generator=g)) for _ in range(args.batch))
        from transformers import AutoModelForCausalLM

        before = AutoModelForCausalLM.from_pretrained(before_path).eval()
        after = AutoModelForCausalLM.from_pretrained(after_path).eval()
        enc = tok(list(prompts), return_tensors="pt")
        n = args.new_tokens

        def run_generate():
            with torch.no_grad():
                after.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        cfg = amp.AmplifyConfig(str(before_path), str(after_path), (1.0,), prompts,
                                amp.Sampling(max_new_tokens=n, temperature=0, batch_size=args.batch),
                                device="cpu", dtype="float32")

        def run_amplify():
            list(amp.amplify_models(before, after, tok, cfg))

        def run_no_cache():
            ids = enc.input_ids
            with torch.no_grad():
                for _ in range(n):
                    a = after(ids, logits_to_keep=1).logits[:, -1]
                    b = before(ids, logits_to_keep=1).logits[:, -1]
                    ids = torch.cat([ids, (2 * a - b).argmax(-1, keepdim=True)], dim=1)

        methods = {"generate": run_generate, "amplify": run_amplify, "no-cache": run_no_cache}
        times = {name: [] for name in methods}
        run_generate()  # warm-up
        for _ in range(args.repeats):
            for name, fn in methods.items():  # interleaved, so drifts in machine load hit all alike
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    tokens = args.batch * n
    print(f"model: GPT-2, {args.layers} layers, width {args.width}, vocab {args.vocab}; batch {args.batch}, "
          f"prompt {args.prompt_tokens} tokens, {n} new tokens; torch threads {torch.get_num_threads()}")
    base = statistics.median(times["generate"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:9s} median {med:7.3f} s  {tokens / med:8.1f} tokens/s  {med / base:5.2f}x generate  "
              f"min {min(ts):7.3f} s  {min(ts) / min(times['generate']):5.2f}x "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
