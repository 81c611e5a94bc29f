"""How much text xc harvest --align aligns for a real pair, and what a crosscoder trained on it gives: a
pretrained WordPiece encoder (MiniLM) against a tiny GPT-2-style byte-level BPE model trained offline on the
same text.

    python benchmarks/align_real_pair.py MINILM_FOLDER [--corpus FILE] [--context-length 64] [--crosscoder]

MINILM_FOLDER is a Hugging Face folder of sentence-transformers/all-MiniLM-L6-v2 (BERT, uncased WordPiece,
384 wide), e.g. the `model/` folder of its pip package. The corpus defaults to the non-empty lines of
this repository's README.md and docs/**/*.md (English prose with code, tables and some non-ASCII). The
byte-level BPE tokenizer (2000 pieces) is trained on that corpus and given a GPT-2 64 wide (tests/tiny_models:
3 layers, 64 positions), itself trained on the corpus as a language model for --lm-steps steps. Layer 1's
resid_post of both models is harvested with --align.

Prints one JSON object: the store's alignment figures (the fraction of characters in stored rows, the
fraction in spans that are one token in both models, the row count, each model's token count), the
GPT-2's training loss, and with --crosscoder what `xc train`, `xc classify --store` and
`xc eval --splice` give for a crosscoder on the store (each command as run is printed on stderr).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models  # noqa: E402  (the offline tokenizer and model builders)
from xcli.data import store as st  # noqa: E402
from xcli.data.harvest import HarvestConfig, harvest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def default_corpus() -> list[str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_lm(folder: Path, tokenizer, lines: list[str], steps: int, context: int, batch: int = 16) -> float:
    """Train the GPT-2 in `folder` on the corpus as a language model (windows of BOS + context - 1 tokens of the
    documents joined by EOS), save it back; the mean loss of the last 20 steps."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    eos = tokenizer.eos_token_id
    stream = [t for ids in tokenizer(lines, add_special_tokens=False)["input_ids"] for t in [*ids, eos]]
    width = context - 1
    windows = torch.tensor([[tokenizer.bos_token_id, *stream[i:i + width]]
                            for i in range(0, len(stream) - width, width)])
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 20) * (1 - step / steps)
        ids = windows[torch.randint(0, len(windows), (batch,), generator=g)]
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(folder)
    return sum(losses[-20:]) / len(losses[-20:])


def xc(*args) -> str:
    command = [sys.executable, "-m", "xcli", *map(str, args)]
    print("+ xc " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def crosscoder_figures(store: Path, root: Path, args) -> dict:
    """Train a crosscoder on the aligned store, classify its latents and evaluate it, through the command line."""
    ckpt = root / "xc.safetensors"
    xc("train", store, "-o", ckpt, "--latents", args.latents, "--k", args.k, "--steps", args.steps,
       "--batch-size", args.batch_size, "--eval-fraction", 0.05, "--device", "cpu", "-q")
    rows = [json.loads(line) for line in xc("classify", ckpt, "--store", store, "--device", "cpu", "-q").splitlines()]
    report = json.loads(xc("eval", ckpt, store, "--splice", "--windows", args.windows, "--device", "cpu", "-q"))
    return {"crosscoder": {"latents": args.latents, "k": args.k, "steps": args.steps, "batch_size": args.batch_size},
            "classes": dict(Counter(r["class"] for r in rows).most_common()),
            "eval": {k: report[k] for k in ("rows", "tokens", "fvu", "fvu_total", "l0", "dead_fraction")},
            "splice": report["splice"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minilm", type=Path)
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--lm-steps", type=int, default=300, help="GPT-2 language-model training steps")
    parser.add_argument("--crosscoder", action="store_true", help="also train, classify and evaluate a crosscoder")
    parser.add_argument("--latents", type=int, default=1024)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--windows", type=int, default=64, help="windows of the spliced-in loss")
    args = parser.parse_args()
    lines = ([line for line in args.corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
             if args.corpus else default_corpus())
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        bpe = tiny_models.build_byte_level_tokenizer(root / "bpe_tokenizer", lines, vocab_size=2000)
        gpt2 = tiny_models.build_model("gpt2", root / "gpt2", bpe, hidden=64)
        lm_loss = train_lm(gpt2, bpe, lines, args.lm_steps, args.context_length) if args.lm_steps else None
        config = HarvestConfig(models=(f"minilm={args.minilm}", f"gpt2={gpt2}"), data=str(corpus),
                               output=root / "s.zarr", layers="1", align=True, context_length=args.context_length,
                               batch_size=8, store_dtype="float32")
        store = st.open_store(harvest(config))
        minilm = AutoTokenizer.from_pretrained(args.minilm)
        counts = {name: sum(len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"])
                  for name, tok in (("minilm", minilm), ("gpt2", bpe))}
        figures = {k: store.alignment[k] for k in ("aligned_fraction", "one_to_one_fraction", "characters",
                                                   "aligned_characters")}
        out = {**figures, "rows": store.n_tokens, "documents": len(lines), "tokens": counts,
               "widths": {s.name: s.d for s in store.sources}, "gpt2_lm_loss": lm_loss}
        if args.crosscoder:
            out.update(crosscoder_figures(store.path, root, args))
        print(json.dumps(out))


if __name__ == "__main__":
    main()
