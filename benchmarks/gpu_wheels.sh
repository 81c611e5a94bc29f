#!/usr/bin/env bash
# Download, here, the wheels that xc needs and the device machine's image lacks (zarr and its
# needs), for its Python 3.12 on x86-64, into .whl/ (ignored by git; carried to the device).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for wheel in "zarr==3.1.6" "numcodecs==0.16.6" "donfig==0.8.1.post1" "google-crc32c"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel"
done
ls -l .whl
