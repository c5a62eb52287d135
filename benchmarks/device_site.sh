#!/usr/bin/env bash
# Packs what the device machine lacks (Ray, Optuna and their needs, for its Python 3.12) into
# .whl/site.tar.xz, under the 64 MiB a device call carries: Ray's Java jars, RLlib, Serve and
# LLM are left out (34 MB packed). benchmarks/device_run.sh unpacks it there.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx /.whl/ .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
rm -rf .whl && mkdir -p .whl/site
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in ray==2.60.0 optuna==5.0.0 alembic colorlog mako sqlalchemy greenlet jsonschema \
    referencing jsonschema-specifications rpds-py tensorboardx pydantic pydantic-core \
    annotated-types typing-inspection; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl "$pkg"
done
for w in .whl/*.whl; do python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('.whl/site')" "$w"; done
chmod -R a+x .whl/site/ray/core  # zipfile drops the modes: gcs_server and raylet are programs
rm -rf .whl/site/ray/{jars,rllib,serve,llm} .whl/site/ray/dashboard/client/build/static/js/*.map
tar -cJf .whl/site.tar.xz -C .whl/site . && rm -rf .whl/site .whl/*.whl
ls -l .whl/site.tar.xz
