"""Harvest wall time with one process against two torchrun ranks on the same CPU cores.

    python benchmarks/harvest_ranks.py [--tokens 8192] [--repeats 3] [--width 512] [--layers 6]

A GPT-2-shaped model with random weights (nothing is downloaded) is saved to a temporary
folder with the offline word-level tokenizer of the tests, and a random corpus is written.
Then, in alternating order, repeated:

    1 proc x 2 threads   python -m xcli harvest ...            (OMP_NUM_THREADS=2)
    2 ranks x 1 thread   torchrun --nproc-per-node 2 -m xcli harvest ...   (OMP_NUM_THREADS=1 each)
    1 proc x 1 thread    python -m xcli harvest ...            (OMP_NUM_THREADS=1)

Each run is the whole command (start-up, model loading, harvest); the same command with
--tokens 64 is timed alongside and subtracted, to leave the harvest itself. Prints every
run, the medians and the ratios of the medians. The CPU is shared: compare ratios only.
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


def timed(mode: str, args: list[str], out: Path) -> float:
    launcher, threads = MODES[mode]
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    subprocess.run([*launcher, "-m", "xcli", "harvest", *args, "-o", str(out), "--overwrite", "--quiet"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
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
        from xcli.store import open_store

        whole = {mode: [] for mode in MODES}
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                full = timed(mode, [*common, "--tokens", str(args.tokens)], root / "s.zarr")
                stored = open_store(root / "s.zarr").n_tokens
                startup = timed(mode, [*common, "--tokens", "64"], root / "t.zarr")
                whole[mode].append((full, startup))
                print(f"repeat {repeat}  {mode:<20} {full:7.2f} s whole, {startup:6.2f} s with 64 tokens, "
                      f"{stored / max(full - startup, 1e-9):8.0f} tok/s harvest", flush=True)
        print(f"\n{stored} tokens, GPT-2 shape d={args.width} x {args.layers} layers, all layers stored, "
              f"windows of {args.context_length}, batches of {args.batch_size}, chunks of {args.chunk_rows}")
        medians = {}
        for mode, runs in whole.items():
            harvest = statistics.median(full - startup for full, startup in runs)
            medians[mode] = harvest
            print(f"{mode:<20} median whole {statistics.median(f for f, _ in runs):7.2f} s, "
                  f"harvest {harvest:7.2f} s = {stored / harvest:8.0f} tok/s")
        base = medians["1 proc x 1 thread"]
        for mode, harvest in medians.items():
            print(f"speed-up over 1 proc x 1 thread: {mode:<20} {base / harvest:5.2f}x")


if __name__ == "__main__":
    main()
