"""Optimal one-to-one assignment (the Hungarian algorithm), so that xc needs no scipy.

`assign(score)` pairs rows with columns of a rectangular score matrix so that the sum of
the scores of the pairs is as large as possible, every row and column used at most once
and min(rows, columns) pairs made. It is the O(n^2 m) shortest augmenting path form of
Kuhn and Munkres with row and column potentials (Jonker and Volgenant's refinement of
it; the textbook version of e-maxx), with the inner loop over columns done by numpy.
"""

import numpy as np


def assign(score) -> list[tuple[int, int]]:
    """(row, column) pairs, sorted by row, maximising the summed score; min(n, m) pairs."""
    score = np.asarray(score, dtype=np.float64)
    if score.ndim != 2:
        raise ValueError(f"score must be a matrix, got shape {score.shape}")
    if not np.all(np.isfinite(score)):
        raise ValueError("score must be finite")
    n, m = score.shape
    if n == 0 or m == 0:
        return []
    if n > m:
        return sorted((r, c) for c, r in assign(score.T))
    cost = -score  # minimise
    u, v = np.zeros(n + 1), np.zeros(m + 1)
    owner = np.zeros(m + 1, dtype=np.int64)  # owner[j]: the row (1-based) holding column j; 0 = free
    way = np.zeros(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = owner[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            j1 = int(np.argmin(np.where(free, minv[1:], np.inf))) + 1
            delta = minv[j1]
            u[owner[used]] += delta
            v[used] -= delta
            minv[~used] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    return sorted((int(owner[j]) - 1, j - 1) for j in range(1, m + 1) if owner[j])


def components(allowed: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """The connected components (rows, columns) of the bipartite graph whose edges are `allowed`;
    rows and columns without an edge are left out."""
    n, m = allowed.shape
    parent = np.arange(n + m)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    rows, cols = np.nonzero(allowed)
    for r, c in zip(rows.tolist(), cols.tolist()):
        a, b = root(r), root(n + c)
        if a != b:
            parent[a] = b
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for r in np.unique(rows).tolist():
        groups.setdefault(root(r), ([], []))[0].append(r)
    for c in np.unique(cols).tolist():
        groups.setdefault(root(n + c), ([], []))[1].append(c)
    return [(np.array(r), np.array(c)) for r, c in groups.values()]


def assign_above(score, threshold: float) -> list[tuple[int, int]]:
    """One-to-one pairs with score >= threshold, sorted by row: the maximum-weight matching over
    those pairs with weight score - threshold.

    Weighing the margin over the threshold, not the score, makes every pair pay the threshold:
    two pairs barely above it never outweigh one near-certain pair they would displace.
    Solved per connected component of the allowed pairs, with the other entries weighing 0: an
    assignment's sum is then the sum of its allowed pairs, so the optimum is the same. The
    components of a crosscoder's latents are small, which keeps this fast for large F."""
    score = np.asarray(score, dtype=np.float64)
    if threshold <= 0:
        raise ValueError("threshold must be positive")
    allowed = score >= threshold
    out = []
    for rows, cols in components(allowed):
        block = np.where(allowed[np.ix_(rows, cols)], score[np.ix_(rows, cols)] - threshold, 0.0)
        out += [(int(rows[r]), int(cols[c])) for r, c in assign(block) if allowed[rows[r], cols[c]]]
    return sorted(out)
