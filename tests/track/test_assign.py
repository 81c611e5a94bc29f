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
