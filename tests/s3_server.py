"""A local S3 API for the tests: moto's server on 127.0.0.1 with one bucket (the `s3` fixture of conftest.py)."""

import logging
import urllib.request
from contextlib import contextmanager

import pytest

from xcli import remote

BUCKET = "xc-test"


@contextmanager
def s3_server():
    """The endpoint and --storage-option of a fresh server with BUCKET; dummy credentials for it in this process
    and its children. Skips the test when s3fs or moto (the [test] extra) is missing."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    keys = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    mp = pytest.MonkeyPatch()
    for key, value in keys.items():
        mp.setenv(key, value)
    mp.delenv("AWS_PROFILE", raising=False)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    try:
        # moto keeps its buckets per process, not per server: start from none (a worker of pytest-xdist may
        # start a server again for another module).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30)
        remote.configure({"endpoint_url": endpoint})
        remote.filesystem("s3").mkdir(BUCKET)
        yield {"endpoint": endpoint, "option": ["--storage-option", f"endpoint_url={endpoint}"], "bucket": BUCKET}
    finally:
        remote._options.clear()
        server.stop()
        mp.undo()
