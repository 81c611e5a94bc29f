"""The Hungarian algorithm against brute force over every assignment."""

import itertools

import numpy as np
import pytest

from xcli.track.assign import assign


def brute_force(score: np.ndarray) -> float:
    n, m = score.shape
    if n > m:
        return brute_force(score.T)
    return max(sum(score[r, c] for r, c in zip(range(n), cols)) for cols in itertools.permutations(range(m), n))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (3, 5), (5, 3), (2, 7), (6, 4)])
def test_assignment_is_optimal_and_one_to_one(shape):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    for trial in range(20):
        score = rng.uniform(-1, 1, shape)
        if trial % 4 == 0:  # ties: many equal scores
            score = np.round(score * 2) / 2
        pairs = assign(score)
        rows, cols = [r for r, _ in pairs], [c for _, c in pairs]
        assert len(pairs) == min(shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        assert sum(score[r, c] for r, c in pairs) == pytest.approx(brute_force(score), abs=1e-9)


def test_a_permuted_identity_is_recovered():
    rng = np.random.default_rng(0)
    perm = rng.permutation(50)
    score = np.eye(50)[perm] + 0.01 * rng.random((50, 50))
    assert assign(score) == [(r, int(perm[r])) for r in range(50)]


def test_empty_and_bad_input():
    assert assign(np.zeros((0, 3))) == []
    with pytest.raises(ValueError):
        assign(np.array([[np.nan]]))


def best_matching_above(score: np.ndarray, threshold: float) -> float:
    """Brute force: the largest sum of score - threshold over one-to-one sets of pairs with score >= threshold."""
    edges = [(r, c) for r in range(score.shape[0]) for c in range(score.shape[1]) if score[r, c] >= threshold]
    best = 0.0
    for size in range(1, min(score.shape) + 1):
        for chosen in itertools.combinations(edges, size):
            if len({r for r, _ in chosen}) == size and len({c for _, c in chosen}) == size:
                best = max(best, sum(score[r, c] - threshold for r, c in chosen))
    return best


@pytest.mark.parametrize("shape", [(3, 3), (4, 5), (5, 4), (6, 6)])
def test_assign_above_is_a_maximum_weight_matching_over_allowed_pairs(shape):
    """Weights are the margins over the threshold."""
    from xcli.track.assign import assign_above

    rng = np.random.default_rng(7 + shape[0] * shape[1])
    for _ in range(15):
        score = rng.uniform(-0.5, 1, shape)
        pairs = assign_above(score, 0.5)
        assert all(score[r, c] >= 0.5 for r, c in pairs)
        assert len({r for r, _ in pairs}) == len(pairs) == len({c for _, c in pairs})
        assert sum(score[r, c] - 0.5 for r, c in pairs) == pytest.approx(best_matching_above(score, 0.5), abs=1e-9)


def test_a_near_certain_pair_is_not_displaced_by_two_weak_ones():
    from xcli.track.assign import assign_above

    score = np.array([[0.99, 0.6], [0.6, 0.0]])  # raw sums: 0.99 alone < 0.6 + 0.6
    assert assign_above(score, 0.5) == [(0, 0)]


def test_components_split_the_allowed_graph():
    from xcli.track.assign import components

    allowed = np.zeros((5, 4), dtype=bool)
    allowed[0, 1] = allowed[2, 1] = allowed[2, 3] = allowed[4, 0] = True
    found = sorted((r.tolist(), c.tolist()) for r, c in components(allowed))
    assert found == [([0, 2], [1, 3]), ([4], [0])]
