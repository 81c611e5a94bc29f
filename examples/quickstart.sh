#!/usr/bin/env bash
# The README's main job: set up, then run the xc pipeline end to end on tiny
# offline models. It grows as subcommands land.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/xc ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e '.[test]'; }
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1
work=${XC_QUICKSTART_DIR:-out/quickstart}
mkdir -p "$work"
echo "xc $(xc --version | awk '{print $3}') in $work" >&2
xc --help >&2
