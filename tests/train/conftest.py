"""Fixtures the training tests share."""

import pytest

from xcli.data import synth


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """A small two-source synthetic store (2048 rows in 16 chunks): 4 shared and 2 exclusive features a model."""
    path = tmp_path_factory.mktemp("small") / "small.zarr"
    synth.make_store(path, n_tokens=2048, d=8, n_shared=4, n_exclusive=2, active=2.0, chunk_rows=128, seed=3)
    return path
