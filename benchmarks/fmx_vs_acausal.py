"""fmxcoders against the standard acausal crosscoder on a synthetic cross-layer benchmark.

    python benchmarks/fmx_vs_acausal.py [--seeds 2] [--tokens 524288] [--workdir DIR]

The data (our own generator, after Sharkey et al.'s planted dictionaries): L layers of
one width d. Each planted feature spans a contiguous range of layers (span 1 = layer-local
up to span L = every layer); within its span its direction drifts with depth (each layer adds
a random component of relative size --drift to the previous direction) and it fires with one
coefficient on all its layers. Firing is Bernoulli with --active features per token on
average, coefficients Uniform(0.5, 1.5), no noise.

Every arm trains through xcli.train.loop with the same F, k (BatchTopK), batch, steps, lr and seed:

    acausal          --arch batchtopk                       (the standard crosscoder)
    acausal+mask     --arch batchtopk --mask-prob 0.05      (masking alone)
    fmx-tr           --arch fmx                             (tensor ring, default ranks, p = 0.05)
    fmx-tr p=0       --arch fmx --mask-prob 0               (factorization alone)
    fmx-tr rank 4    --arch fmx --ranks 4                   (a low rank: joint rank 16 < L * d)
    fmx-cp           --arch fmx --factorization cp          (CP, default rank, p = 0.05)

and is scored on fresh rows from the same generator:
    recovered by span   planted features with a latent whose decoder, concatenated over all
                        layers in raw units, has cosine > 0.9 with the planted one (zero off its span)
    FVU                 squared error / variance, summed over layers, raw units
    L0                  mean active latents per token (BatchTopK threshold at inference)
    coherence           mean functional coherence of the latents that fire (xcli.analysis.coherence)
    C of matched        mean coherence of the latents matched to span-1 and to span-L features
                        (ideal: about 1 and about L)

Prints one markdown table per run (mean over --seeds, seeds listed) to stdout.
"""

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import xcli
from xcli.analysis.coherence import functional_coherence
from xcli.crosscoder.fmx import FmxCrosscoder
from xcli.data.store import StoreWriter
from xcli.source import Source
from xcli.train.loop import TrainConfig, train

ARMS = {
    "acausal": dict(arch="batchtopk"),
    "acausal+mask": dict(arch="batchtopk", mask_prob=0.05),
    "fmx-tr": dict(arch="fmx"),
    "fmx-tr p=0": dict(arch="fmx", mask_prob=0.0),
    "fmx-tr rank 4": dict(arch="fmx", ranks=(4, 4, 4)),
    "fmx-cp": dict(arch="fmx", factorization="cp"),
}


def plant(n_layers, d, n_features, active, drift, rng):
    """Spans (start, stop) and directions (G, L, d): unit vectors on the span, zero elsewhere."""
    span = np.arange(n_features) % n_layers + 1  # every span length equally often
    start = np.array([rng.integers(0, n_layers - s + 1) for s in span])
    directions = np.zeros((n_features, n_layers, d))
    for g in range(n_features):
        u = rng.standard_normal(d)
        u /= np.linalg.norm(u)
        for layer in range(start[g], start[g] + span[g]):
            directions[g, layer] = u
            step = rng.standard_normal(d)
            u = u + drift * step / np.linalg.norm(step)
            u /= np.linalg.norm(u)
    frequency = np.full(n_features, active / n_features)
    return span, start, directions, frequency


def sample(directions, frequency, rows, rng):
    fires = rng.random((rows, len(frequency))) < frequency
    coefficients = fires * rng.uniform(0.5, 1.5, fires.shape)
    x = np.einsum("tg,gld->tld", coefficients, directions).astype(np.float32)
    return x  # (rows, L, d)


def layer_names(n_layers):
    return [f"m.resid.{layer}" for layer in range(n_layers)]


def write_store(path, directions, frequency, n_tokens, seed):
    n_layers, d = directions.shape[1:]
    sources = [Source(name, "m", "resid", layer, d) for layer, name in enumerate(layer_names(n_layers))]
    writer = StoreWriter(path, sources, {"dataset": "synthetic-cross-layer"}, dtype="float32", chunk_rows=1024)
    for block, start in enumerate(range(0, n_tokens, 8192)):
        x = sample(directions, frequency, min(8192, n_tokens - start), np.random.default_rng([seed, 1, block]))
        writer.append({name: x[:, layer] for layer, name in enumerate(layer_names(n_layers))},
                      tokens=np.zeros(len(x), dtype=np.int64))
    writer.close(complete=True)


def score(path, span, directions, x_eval):
    model = xcli.load(path)
    names = layer_names(directions.shape[1])
    with torch.no_grad():
        raw = torch.cat([model.decoder_weight(n) / model.scale(n) for n in names], dim=1).numpy()  # (F, L*d)
    planted = directions.reshape(len(directions), -1)
    planted = planted / np.linalg.norm(planted, axis=1, keepdims=True)
    learned = raw / np.maximum(np.linalg.norm(raw, axis=1, keepdims=True), 1e-12)
    cos = planted @ learned.T
    best, best_latent = cos.max(1), cos.argmax(1)
    x = {n: torch.from_numpy(x_eval[:, layer]) for layer, n in enumerate(names)}
    with torch.no_grad():
        f = model.encode(x)
        recon = model.decode(f)
    err = sum(float((x[n] - recon[n]).double().pow(2).sum()) for n in names)
    var = sum(float((x[n] - x[n].mean(0)).double().pow(2).sum()) for n in names)
    batches = ({n: v[i:i + 2048] for n, v in x.items()} for i in range(0, len(x_eval), 2048))
    coh = functional_coherence(model, batches)
    n_layers = directions.shape[1]
    out = {"fvu": err / var, "l0": float((f != 0).sum(1).float().mean()), "coherence": coh.mean(),
           "dead": float(np.mean(coh.frequency == 0))}
    for lo, hi in span_groups(n_layers):
        chosen = (span >= lo) & (span <= hi)
        out[f"rec {lo}-{hi}"] = float((best[chosen] > 0.9).mean())
    for s in (1, n_layers):
        hit = (span == s) & (best > 0.9)
        matched = coh.coherence[best_latent[hit]]
        out[f"C span {s}"] = float(np.nanmean(matched)) if np.isfinite(matched).any() else float("nan")
    return out


def checkpoint(work, arm, seed):
    return work / f"{arm.replace(' ', '_').replace('=', '')}-{seed}.safetensors"


def span_groups(n_layers):
    third = max(1, n_layers // 3)
    return [(1, 1), (2, third + 1), (third + 2, n_layers)] if n_layers > 2 else [(1, n_layers)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--features", type=int, default=48)
    parser.add_argument("--active", type=float, default=3.0)
    parser.add_argument("--drift", type=float, default=0.3)
    parser.add_argument("--latents", type=int, default=128)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--store-tokens", type=int, default=65536)
    parser.add_argument("--tokens", type=int, default=524288, help="training tokens per arm")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--workdir")
    parser.add_argument("--fmx-unit-init", action="store_true",
                        help="start fmx decoders at unit norm over the layers (as the acausal crosscoder) "
                             "instead of 0.1 per layer")
    args = parser.parse_args()
    if args.fmx_unit_init:
        shipped = FmxCrosscoder.init_weights
        FmxCrosscoder.init_weights = lambda self, generator=None, decoder_norm=None: shipped(
            self, generator, len(self.write) ** -0.5)
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the 2 shared cores stay usable
    work = Path(args.workdir or tempfile.mkdtemp(prefix="xc-fmx-bench-"))
    arms = args.arms.split(",")
    rows = {arm: [] for arm in arms}
    seconds = {arm: 0.0 for arm in arms}
    for seed in range(args.seeds):
        rng = np.random.default_rng([seed, 0])
        span, start, directions, frequency = plant(args.layers, args.d, args.features, args.active, args.drift, rng)
        store = work / f"cross-layer-{seed}.zarr"
        if not store.exists():
            write_store(store, directions, frequency, args.store_tokens, seed)
        x_eval = sample(directions, frequency, 16384, np.random.default_rng([seed, 2]))
        for arm in arms:  # interleaved: every seed runs every arm in turn
            out = checkpoint(work, arm, seed)
            began = time.perf_counter()
            train(TrainConfig(stores=(str(store),), output=str(out), latents=args.latents, k=args.k,
                              batch_size=args.batch_size, tokens=args.tokens, eval_fraction=0.0,
                              dead_tokens=args.batch_size * 50, shuffle_buffer=16384, checkpoint_every=10 ** 9,
                              seed=seed, device="cpu", overwrite=True, **ARMS[arm]))
            seconds[arm] += time.perf_counter() - began
            rows[arm].append(score(out, span, directions, x_eval))
            print(f"seed {seed} {arm}: {rows[arm][-1]}", file=sys.stderr, flush=True)
    keys = list(rows[arms[0]][0])
    ranks = {arm: xcli.load(checkpoint(work, arm, 0)).metadata["hyperparameters"]["ranks"] for arm in arms}
    print(f"\nL = {args.layers} layers, d = {args.d}, {args.features} features (spans 1..{args.layers} equally often), "
          f"{args.active} active per token, drift {args.drift}; F = {args.latents}, k = {args.k}, "
          f"{args.tokens} training tokens, batch {args.batch_size}; mean of seeds 0..{args.seeds - 1}\n")
    print("| arm | " + " | ".join(keys) + " | train s |")
    print("|---|" + "---:|" * (len(keys) + 1))
    for arm in arms:
        means = [np.nanmean([r[k] for r in rows[arm]]) for k in keys]
        label = f"{arm} (ranks {','.join(map(str, ranks[arm]))})" if ranks[arm] else arm
        print(f"| {label} | " + " | ".join(f"{v:.3f}" if math.isfinite(v) else "n/a" for v in means)
              + f" | {seconds[arm] / args.seeds:.0f} |")


if __name__ == "__main__":
    main()
