#!/usr/bin/env bash
# How robust the planted chain of three tiny language models is (tests/track/test_release_chain.py):
# runs that test once per seed (XC_RELEASE_CHAIN_SEED picks the models, corpus and planting) and
# prints which seeds pass, then the count.
#
#   benchmarks/release_chain_seeds.sh [FIRST [LAST]]     # seeds 0..9 by default
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
first=${1:-0} last=${2:-9} passed=0
for seed in $(seq "$first" "$last"); do
    if XC_RELEASE_CHAIN_SEED=$seed PYTHONPATH=$PWD "$python" -m pytest -q -x -p no:cacheprovider \
            tests/track/test_release_chain.py >/dev/null 2>&1; then
        echo "seed $seed: pass"; passed=$((passed + 1))
    else
        echo "seed $seed: FAIL (rerun: XC_RELEASE_CHAIN_SEED=$seed pytest tests/track/test_release_chain.py)"
    fi
done
echo "$passed of $((last - first + 1)) seeds pass"
