"""How many live latents two trainings of the same pair match, with `xc track`'s matching.

A synthetic two-release store with a planted dictionary (shared features, and features of
each release's own); crosscoders over the pair trained with seeds 0..S-1 (TopK, the recipe of
tests/track/track_chain.py). For every two seeds it matches the latents that fire and are alive in
the first release (as `xc track add` does), through that release, with decoders alone and with activation agreement on the store, and prints
the fraction matched (matches / live latents of the smaller side), the median decoder cosine
of the matches, how many planted features each crosscoder learnt (best cosine > 0.95), and for
the features present in v1 that both learnt, how often their two latents are matched to each
other (planted_pairs_matched).

    python benchmarks/track_seeds.py [--seeds 3] [--latents 32] [--width 12] [--shared 8] [--exclusive 2]
"""

import argparse
import itertools
import json
import tempfile
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--width", type=int, default=12)
    parser.add_argument("--shared", type=int, default=8)
    parser.add_argument("--exclusive", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()

    from xcli.analysis.classify import classify
    from xcli.crosscoder.model import load
    from xcli.data.config import SynthSpec
    from xcli.data.store import open_store
    from xcli.data.synth import generate
    from xcli.data.synth import match as truth_match
    from xcli.track.chain import statuses
    from xcli.track.match import encode_stores, match
    from xcli.train import TrainConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        spec = SynthSpec(models=("v1", "v2"), width=args.width, shared=args.shared, exclusive=args.exclusive,
                         active=2.0, tokens=args.tokens, seed=0)
        truth = generate(spec, folder / "acts.zarr")
        store = open_store(folder / "acts.zarr")
        models = []
        for seed in range(args.seeds):
            path = train(TrainConfig(stores=(str(folder / "acts.zarr"),), output=str(folder / f"s{seed}.safetensors"),
                                     arch="topk", latents=args.latents, k=2, batch_size=256, tokens=6 * 8192, lr=5e-3,
                                     dead_tokens=2000, shuffle_buffer=2048, eval_fraction=0.125, seed=seed,
                                     device="cpu", log_every=10 ** 6, checkpoint_every=10 ** 6))
            models.append(load(path))
        found = [truth_match(truth, m) for m in models]
        learnt = [int((f.cosine > 0.95).sum()) for f in found]
        for a, b in itertools.combinations(range(args.seeds), 2):
            passes = encode_stores([models[a], models[b]], [store], None, 0, 4096, "cpu")
            # Eligible as in `xc track add`: fires, and alive in v1 (the release matched through).
            alive = [statuses(classify(models[s]).norm, 0.9, (0.3, 0.7))[0][:, 0] for s in (a, b)]
            live = [np.flatnonzero((p.frequency > 0) & al) for p, al in zip(passes, alive)]
            for label, stores in (("decoders", []), ("decoders+activations", [store])):
                m = match(models[a], models[b], "v1", live[0], live[1], stores)
                # Planted features present in v1 (matchable through it) that both seeds learnt: is
                # the one's latent matched to the other's?
                in_v1 = np.linalg.norm(truth.decoders["v1.synthetic.0"], axis=1) > 0
                both = (found[a].cosine > 0.95) & (found[b].cosine > 0.95) & in_v1
                same = [(int(found[a].latent[g]), int(found[b].latent[g])) in set(m.pairs) for g in np.flatnonzero(both)]
                print(json.dumps({"seeds": [a, b], "matching": label, "live": [len(x) for x in live],
                                  "matched": len(m.pairs), "fraction_matched": round(m.fraction_matched, 3),
                                  "median_cosine": round(float(np.median([m.decoder_cosine[i, j] for i, j in m.pairs])), 4),
                                  "planted_learnt": [learnt[a], learnt[b]], "planted": truth.n_features,
                                  "planted_pairs_matched": f"{sum(same)}/{len(same)}"}))


if __name__ == "__main__":
    main()
