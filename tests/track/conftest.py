"""The planted chain of track_chain.py, built once per test session."""

import pytest
from track_chain import SPEC, Chain, train_pair

from xcli.data.synth import generate


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> Chain:
    folder = tmp_path_factory.mktemp("chain")
    store = folder / "acts.zarr"
    truth = generate(SPEC, store)
    crosscoders = {
        "v1v2": train_pair(store, folder / "v1v2.safetensors", "v1", "v2", 0),
        "v2v3": train_pair(store, folder / "v2v3.safetensors", "v2", "v3", 0),
        "v2v3_seed1": train_pair(store, folder / "v2v3_seed1.safetensors", "v2", "v3", 1),
        "v1v2v3": train_pair(store, folder / "v1v2v3.safetensors", "v1", "v2", 0, "v3"),
    }
    return Chain(folder, store, truth, crosscoders)
