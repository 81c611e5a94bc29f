"""Harvest throughput against a bare forward pass of the same model on the same batches.

    python benchmarks/harvest_speed.py [--tokens 2048] [--repeats 9] [--layers all] [--dtype float32]
                                       [--threads N] [--device cuda] [--json FILE] [--small]

A GPT-2-small-shaped model (12 layers, d=768) with random weights is saved to a
temporary folder (throughput does not depend on the weight values; nothing is
downloaded). The same token batches are then run, in alternating order, repeated:

    bare     the base model's forward pass, outputs discarded
    harvest  xcli.data.harvest's streaming loop: hooks, dropping special tokens,
             conversion to the storage dtype, and writing the store (writer thread)

Model loading and store creation are outside both timings. Prints tokens/s per
run, the medians, and the median of the per-pair ratios bare/harvest time. On a
GPU both run there, timed to the end of the device's work. --small uses a 2-layer,
d=64 model instead (checks the script quickly).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models  # noqa: E402  (the offline word-level tokenizer and a corpus generator)
from xcli import files  # noqa: E402
from xcli.data.harvest import HarvestConfig, open_writer, prepare  # noqa: E402


def build_model(root: Path, small: bool = False) -> Path:
    """A GPT-2-small-shaped model (12 layers, d=768; small: 2 layers, d=64) with random weights."""
    from transformers import AutoModel, GPT2Config

    tokenizer = tiny_models.build_tokenizer(root / "tokenizer")
    width, layers, heads = (64, 2, 2) if small else (768, 12, 12)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=1024, vocab_size=50257,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    model.save_pretrained(root / "gpt2-small")
    tokenizer.save_pretrained(root / "gpt2-small")
    return root / "gpt2-small"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per run")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--context-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    parser.add_argument("--small", action="store_true", help="a 2-layer, d=64 model: checks the script")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-batch breakdown")
    args = parser.parse_args()
    device = torch.device(args.device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="xc-bench-"))
    try:
        model_path = build_model(root, args.small)
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(tiny_models.corpus_lines(args.tokens // 10, seed=1, min_words=20)) + "\n")

        def config(name):
            return HarvestConfig(models=(f"gpt2={model_path}",), data=str(corpus), output=root / name,
                                 layers=args.layers, context_length=args.context_length, tokens=args.tokens,
                                 batch_size=args.batch_size, dtype=args.dtype, device=args.device)

        run = prepare(config("probe.zarr"))
        batches = list(run.batches)  # the same batches for both
        model = run.models[0].model
        n_sources = len(run.sources)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; "
              f"{'2 x 64' if args.small else 'GPT-2-small'} shape, {args.dtype}; "
              f"{len(batches)} batches of {args.batch_size}x{args.context_length}; {n_sources} sources "
              f"({args.layers}), stored as {run.store_dtype}", flush=True)

        def bare():
            synchronize()
            start, rows = time.perf_counter(), 0
            with torch.inference_mode():
                for batch in batches:
                    ids, mask = torch.from_numpy(batch.ids).to(device), torch.from_numpy(batch.mask).to(device)
                    model(input_ids=ids, attention_mask=mask)
                    rows += int(run.keep_mask(batch).sum())
                    if rows >= args.tokens:
                        break
            synchronize()
            return min(rows, args.tokens), time.perf_counter() - start

        def harvest(i):
            cfg = config(f"run{i}.zarr")
            run.config, run.batches = cfg, iter(batches)
            writer = open_writer(run, "new")
            synchronize()
            start = time.perf_counter()
            run.stream(writer)  # ends when the writer has stored every row
            elapsed = time.perf_counter() - start
            files.remove(cfg.output)
            return writer.n_tokens, elapsed

        bare()  # warm-up
        rates = {"bare": [], "harvest": []}
        ratios = []
        for i in range(args.repeats):
            if i % 2 == 0:  # alternate which goes first, so that drifting load hits both alike
                (n_bare, t_bare), (n_harvest, t_harvest) = bare(), harvest(i)
            else:
                (n_harvest, t_harvest), (n_bare, t_bare) = harvest(i), bare()
            assert n_bare == n_harvest, (n_bare, n_harvest)
            rates["bare"].append(n_bare / t_bare)
            rates["harvest"].append(n_harvest / t_harvest)
            ratios.append(t_harvest / t_bare)
            print(f"  pair {i + 1}: bare {n_bare / t_bare:8.0f} tok/s   harvest {n_harvest / t_harvest:8.0f} tok/s"
                  f"   harvest/bare time {ratios[-1]:.3f}", flush=True)
        print(f"median: bare {statistics.median(rates['bare']):.0f} tok/s, harvest "
              f"{statistics.median(rates['harvest']):.0f} tok/s, harvest/bare time {statistics.median(ratios):.3f}x "
              f"(target <= 1.15x)", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "device": str(device), "torch": torch.__version__, "shape": "2x64" if args.small else "gpt2-small",
                "dtype": args.dtype, "tokens": args.tokens, "repeats": args.repeats, "sources": n_sources,
                "bare_tokens_per_s": rates["bare"], "harvest_tokens_per_s": rates["harvest"],
                "harvest_over_bare_time": ratios, "median_ratio": statistics.median(ratios)}, indent=1))
        if not args.no_breakdown and device.type == "cpu":
            breakdown(run, batches, model, config("parts.zarr"))
        run.close()
    finally:
        files.remove(root)


def breakdown(run, batches, model, cfg):
    """The harvest's own costs, batch by batch, interleaved with the bare forward (robust to drifting load).

    Serial: the writer's work is timed on the main thread, so the sum is an upper bound
    on what the harvest costs when nothing overlaps.
    """
    from xcli.data.harvest import _numpy

    run.config = cfg
    writer = open_writer(run, "new")
    parts = {"bare": [], "hooks": [], "writer": []}
    for batch in batches * 2:
        keep = run.keep_mask(batch)
        ids, mask = torch.from_numpy(batch.ids), torch.from_numpy(batch.mask)
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)
        parts["bare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        acts = run.activations(batch, keep)
        parts["hooks"].append(time.perf_counter() - start)
        start = time.perf_counter()
        rows = int(keep.sum())
        writer.append({n: _numpy(a) for n, a in acts.items()}, tokens=batch.ids[keep],
                      sequence=np.zeros(rows), position=np.zeros(rows))
        parts["writer"].append(time.perf_counter() - start)
    start = time.perf_counter()
    writer.close()
    parts["writer"][-1] += time.perf_counter() - start
    files.remove(cfg.output)
    bare = statistics.median(parts["bare"])
    hooks = statistics.median(parts["hooks"])
    write = statistics.mean(parts["writer"])  # flushes happen every few batches: mean, not median
    print(f"per batch ({len(parts['bare'])} batches, interleaved): bare forward {bare * 1e3:.0f} ms (median), "
          f"forward with hooks and conversion {hooks * 1e3:.0f} ms (median), writer {write * 1e3:.0f} ms (mean); "
          f"serial upper bound (hooks + writer) / bare = {(hooks + write) / bare:.3f}x")


if __name__ == "__main__":
    main()
