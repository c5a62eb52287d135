#!/usr/bin/env bash
# The device check as one call on a lent GPU machine (its own python3 and torch, no network):
# unpacks .whl/site.tar.xz (benchmarks/device_site.sh), installs towerspace in place, runs
# benchmarks/gpu_check.py into /tmp/check within LIMIT seconds (default 450), then copies
# its report (not the sweep folder: a call brings back at most 8 files) to $OUT.
#   device run: bash benchmarks/device_run.sh [gpu_check args...]   (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site RAY_USAGE_STATS_ENABLED=0
mkdir -p /tmp/site /tmp/check && tar -xJf .whl/site.tar.xz -C /tmp/site || exit 3
chmod -R a+x /tmp/site/ray/core  # Ray starts its gcs_server and raylet from there
if ls .whl/*.whl >/dev/null 2>&1; then  # wheels beside the packed site (added later)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 3
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/pip.log" 2>&1
bin="$(dirname "$(python3 -c 'import sys; print(sys.executable)')")"
if [ ! -x "$bin/towerspace" ]; then  # pip could not install: a launcher of the same command
  printf '#!/bin/sh\nexec %s -c "import sys; from towerspace.cli import main; sys.exit(main())" "$@"\n' \
    "$bin/python3" >"$bin/towerspace" && chmod +x "$bin/towerspace"
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c 'import torch, ray, optuna, timm; print(torch.__version__, ray.__version__, optuna.__version__, timm.__version__)'
timeout "${LIMIT:-450}" python3 benchmarks/gpu_check.py /tmp/check "$@" 2>&1 | tee "$OUT/check.log"
echo "exit ${PIPESTATUS[0]}"
cp /tmp/check/report.* /tmp/check/gpu_tests.xml /tmp/check/estimate.csv "$OUT/" 2>/dev/null
ls -l "$OUT"
