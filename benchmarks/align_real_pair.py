"""How much text xc harvest --align aligns for a real pair: a pretrained WordPiece encoder (MiniLM) against
a tiny GPT-2-style byte-level BPE model trained offline on the same text.

    python benchmarks/align_real_pair.py MINILM_FOLDER [--corpus FILE] [--context-length 64]

MINILM_FOLDER is a Hugging Face folder of sentence-transformers/all-MiniLM-L6-v2 (BERT, uncased WordPiece,
384 wide), e.g. the `model/` folder of its pip package. The corpus defaults to the non-empty lines of
this repository's README.md and docs/**/*.md (English prose with code, tables and some non-ASCII). The
byte-level BPE tokenizer (2000 pieces) is trained on that corpus and given a random 2-layer GPT-2, 64 wide.
Prints the store's alignment figures as one JSON object: the fraction of characters in stored rows, the
fraction in spans that are one token in both models, the row count and each model's token count.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models  # noqa: E402  (the offline tokenizer and model builders)
from xcli.data import store as st  # noqa: E402
from xcli.data.harvest import HarvestConfig, harvest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def default_corpus() -> list[str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [line.strip() for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("minilm", type=Path)
    parser.add_argument("--corpus", type=Path)
    parser.add_argument("--context-length", type=int, default=64)
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
        config = HarvestConfig(models=(f"minilm={args.minilm}", f"gpt2={gpt2}"), data=str(corpus),
                               output=root / "s.zarr", layers="1", align=True, context_length=args.context_length,
                               batch_size=8, store_dtype="float32")
        store = st.open_store(harvest(config))
        minilm = AutoTokenizer.from_pretrained(args.minilm)
        counts = {name: sum(len(ids) for ids in tok(lines, add_special_tokens=False)["input_ids"])
                  for name, tok in (("minilm", minilm), ("gpt2", bpe))}
        figures = {k: store.alignment[k] for k in ("aligned_fraction", "one_to_one_fraction", "characters",
                                                   "aligned_characters")}
        print(json.dumps({**figures, "rows": store.n_tokens, "documents": len(lines), "tokens": counts,
                          "widths": {s.name: s.d for s in store.sources}}))


if __name__ == "__main__":
    main()
