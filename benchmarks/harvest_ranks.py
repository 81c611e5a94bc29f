"""Harvest wall time with one process against two torchrun ranks on the same CPU cores.

    python benchmarks/harvest_ranks.py [--tokens 32768] [--repeats 3] [--width 256] [--layers 4]

A GPT-2-shaped model with random weights (nothing is downloaded) is saved to a temporary
folder with the offline word-level tokenizer of the tests, and a random corpus is written.
Then, in alternating order, repeated:

    1 proc x 2 threads   python -m xcli harvest ...            (OMP_NUM_THREADS=2)
    2 ranks x 1 thread   torchrun --nproc-per-node 2 -m xcli harvest ...   (OMP_NUM_THREADS=1 each)
    1 proc x 1 thread    python -m xcli harvest ...            (OMP_NUM_THREADS=1)

Each run is the whole command. The harvest itself, without start-up and model loading, is
timed from the files it writes: from the creation of the store (its stats/*/mean/zarr.json,
written once, after the models are loaded and before the first batch) to its last commit
(the group's zarr.json). Prints every run, the medians, and the speed ratios to one process
with one thread within each repeat. The CPU is shared: compare ratios only.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import tiny_models  # noqa: E402  (the offline tokenizer and a corpus generator)


def build_model(root: Path, width: int, layers: int) -> Path:
    import torch
    from transformers import AutoModel, GPT2Config

    tokenizer = tiny_models.build_tokenizer(root / "tokenizer")
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=8, n_positions=1024, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


MODES = {
    "1 proc x 2 threads": ([sys.executable], "2"),
    "2 ranks x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
                           "1"),
    "1 proc x 1 thread": ([sys.executable], "1"),
}


def timed(mode: str, args: list[str], out: Path) -> tuple[float, float]:
    """Seconds for the whole command, and for the harvest from the store's creation to its commit."""
    launcher, threads = MODES[mode]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    subprocess.run([*launcher, "-m", "xcli", "harvest", *args, "-o", str(out), "--overwrite", "--quiet"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    whole = time.perf_counter() - began
    created = min(p.stat().st_mtime for p in out.glob("stats/*/mean/zarr.json"))
    return whole, (out / "zarr.json").stat().st_mtime - created


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--chunk-rows", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(root, args.width, args.layers)
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(tiny_models.corpus_lines(args.tokens // 10, seed=1)) + "\n")
        common = ["--model", str(model), "--layers", "all", "--data", str(corpus), "--device", "cpu",
                  "-c", str(args.context_length), "-b", str(args.batch_size), "--chunk-rows", str(args.chunk_rows)]
        from xcli.data.store import open_store

        runs = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                whole, harvest = timed(mode, [*common, "--tokens", str(args.tokens)], root / "s.zarr")
                stored = open_store(root / "s.zarr").n_tokens
                runs[mode].append(harvest)
                print(f"repeat {repeat}  {mode:<20} {whole:7.2f} s whole command, harvest {harvest:6.2f} s = "
                      f"{stored / harvest:7.0f} tok/s", flush=True)
        print(f"\n{stored} tokens, GPT-2 shape d={args.width} x {args.layers} layers, all layers stored, "
              f"windows of {args.context_length}, batches of {args.batch_size}, chunks of {args.chunk_rows}")
        base = runs["1 proc x 1 thread"]
        for mode, times in runs.items():
            ratios = [b / t for b, t in zip(base, times)]  # within one repeat: the same load, roughly
            print(f"{mode:<20} harvest median {statistics.median(times):7.2f} s = "
                  f"{stored / statistics.median(times):7.0f} tok/s; speed over 1 proc x 1 thread in the same "
                  f"repeat: median {statistics.median(ratios):.2f}x ({min(ratios):.2f} to {max(ratios):.2f})")


if __name__ == "__main__":
    main()
