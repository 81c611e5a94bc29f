"""Speed of `xc track`'s matching step (cosines, then the assignment) as the dictionary grows.

Two dictionaries of F random directions in 256 dimensions, the second a permuted, noisy copy
of the first (noise 0.5 per coordinate: matched cosines about 0.9); cosines as in
xcli.track.match, then the maximum-weight matching above 0.5 (xcli.track.assign.assign_above,
solved per connected component). Also the dense Hungarian algorithm on one random n x n
matrix, the case where every pair is a candidate.

    python benchmarks/track_assign_speed.py [--latents 1024 4096] [--dense 500]
"""

import argparse
import json
import time

import numpy as np

from xcli.track.assign import assign, assign_above
from xcli.track.match import cosine_matrix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--dense", type=int, default=500)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    for F in args.latents:
        a = rng.standard_normal((F, 256))
        perm = rng.permutation(F)
        b = a[perm] + 0.5 * rng.standard_normal((F, 256))
        start = time.perf_counter()
        cos = cosine_matrix(a, b)
        cos_s = time.perf_counter() - start
        start = time.perf_counter()
        pairs = assign_above(cos, 0.5)
        assign_s = time.perf_counter() - start
        correct = float(np.mean([perm[j] == i for i, j in pairs])) if pairs else 0.0
        print(json.dumps({"latents": F, "cosine_s": round(cos_s, 3), "assign_above_s": round(assign_s, 3),
                          "pairs": len(pairs), "correct": correct}))
    start = time.perf_counter()
    assign(rng.random((args.dense, args.dense)))
    print(json.dumps({"dense_n": args.dense, "assign_s": round(time.perf_counter() - start, 3)}))


if __name__ == "__main__":
    main()
