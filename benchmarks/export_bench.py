"""Time `xc export` phase by phase against one plain encode pass over the same store.

    python benchmarks/export_bench.py [--tokens 131072] [--latents 4096] [--d 256] [--repeat 3]

Builds, in a temporary folder, a synthetic two-source store (random activations,
real token ids of the tiny test tokenizer, 128-token sequences), a sparse ReLU
crosscoder (about 2% density) and a one-layer GPT-2 whose width matches, so the
logit lens runs. Each repeat times one plain encode pass (every latent on every
token: the least any exporter must do), then a full export, interleaved so that
both see the same machine load. Prints one JSON line per repeat, then the medians.
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
import tiny_models  # noqa: E402
from xcli.crosscoder import model as cc  # noqa: E402
from xcli.data.store import StoreWriter, open_store  # noqa: E402
from xcli.export import dashboards as db  # noqa: E402
from xcli.export import export  # noqa: E402
from xcli.export import neuronpedia as ex  # noqa: E402
from xcli.source import Source  # noqa: E402

CONTEXT = 128


def build(root: Path, n_tokens: int, n_latents: int, d: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_models.build_tokenizer(root / "tokenizer")
    model_dir = root / "lm"
    GPT2LMHeadModel(GPT2Config(n_embd=d, n_layer=1, n_head=4, vocab_size=len(tokenizer))).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sources = [Source(f"{m}.resid_post.0", str(model_dir), "resid_post", 0, d) for m in ("a", "b")]
    rng = np.random.default_rng(0)
    writer = StoreWriter(root / "acts.zarr", sources, {"tokenizer": str(root / "tokenizer")}, dtype="float16")
    for start in range(0, n_tokens, CONTEXT):
        rows = min(CONTEXT, n_tokens - start)
        acts = {s.name: rng.standard_normal((rows, d), dtype=np.float32) for s in sources}
        writer.append(acts, tokens=rng.integers(5, len(tokenizer), rows), sequence=np.full(rows, start // CONTEXT),
                      position=np.arange(1, rows + 1))
    writer.close()
    model = cc.Crosscoder([Source(s.name, "lm", s.site, s.layer, d) for s in sources], n_latents, "relu")
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.b_enc.fill_(-0.6)  # about 2% of latents fire on random inputs
    cc.save(model, root / "xc.safetensors")
    return root / "xc.safetensors", root / "acts.zarr", model_dir


def timed(fn):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[fn.__name__] = timings.get(fn.__name__, 0.0) + time.perf_counter() - t
        return out
    return wrapper


timings: dict[str, float] = {}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--latents", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    db.first_pass, db.second_pass, ex.write_batches = (timed(db.first_pass), timed(db.second_pass),
                                                       timed(ex.write_batches))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint, store_path, model_dir = build(root, args.tokens, args.latents, args.d)
        store, model = open_store(store_path), cc.load(checkpoint)
        rows = []
        for r in range(args.repeat):
            t = time.perf_counter()
            encoder = db.LatentEncoder(model, np.arange(model.n_latents), torch.device("cpu"))
            for _ in db.encode_blocks(store, encoder):
                pass
            encode = time.perf_counter() - t
            timings.clear()
            t = time.perf_counter()
            out = export(ex.ExportConfig(checkpoint, root / f"np{r}", store=store_path, device="cpu",
                                            model_paths=(f"lm={model_dir}",)))
            total = time.perf_counter() - t
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            rows.append({"tokens": store.n_tokens, "latents": model.n_latents, "d": args.d,
                         "encode_pass_s": round(encode, 3), "export_s": round(total, 3),
                         "pass1_s": round(timings["first_pass"], 3), "pass2_s": round(timings["second_pass"], 3),
                         "windows_and_files_s": round(timings["write_batches"], 3),
                         "export_over_encode": round(total / encode, 2), "export_bytes": size,
                         "tokens_per_s": round(store.n_tokens / total)})
            print(json.dumps(rows[-1]), flush=True)
        summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(json.dumps({"median": summary, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
