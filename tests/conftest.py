import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# Never reach a model hub from a test, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import tiny_models  # noqa: E402

# Every test computes on one thread, and so does every process a test starts (torchrun ranks, `xc`
# in a subprocess): tiny matmuls are fastest so, the CPU is shared, and in-process and subprocess runs
# then do identical arithmetic, bit for bit. Set once for the session, before any fixture computes.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)

# Without a GPU, the Triton kernels (tests/crosscoder/test_kernels.py) run under Triton's interpreter, which
# must be on before triton is imported and while kernels are decorated and launched.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Folders of tiny random models (gpt2, gpt2_b, gpt_neox, llama, bert) and the tokenizer."""
    return tiny_models.build_all(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(tiny_models.corpus_lines(60)) + "\n")
    return path


@pytest.fixture(scope="module")
def s3():
    """A local S3 server (moto, on 127.0.0.1) with one bucket, s3_server.BUCKET, for the module's tests:
    {"endpoint", "option": the --storage-option arguments, "bucket"}. Skips without s3fs and moto."""
    from s3_server import s3_server

    with s3_server() as server:
        yield server


@pytest.fixture(autouse=True)
def one_thread():
    """A test that changes the thread count (a benchmark-like check, say) cannot leak it into the next."""
    yield
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _reset_console():
    """Commands set quiet/debug globally; each test starts from the defaults."""
    from xcli import console

    console.settings.quiet = False
    console.settings.debug = False
    yield
