#!/usr/bin/env bash
# Download into .whl/ (git-ignored) the wheels a GPU sitting carries: the GPU image has no package index,
# and lacks some of pyproject.toml's dependencies (platformdirs at least; scripts/gpu_sitting.sh checks each
# import and names what is missing). scripts/gpu_sitting.sh installs .whl/*.whl with
# `pip install --no-index --no-deps` before installing this checkout.
#
#   bash scripts/fetch_gpu_wheels.sh                   # platformdirs tabulate (pure Python)
#   bash scripts/fetch_gpu_wheels.sh jinja2 markupsafe # others by name (jinja2 needs markupsafe)
#   SETUPTOOLS=1 bash scripts/fetch_gpu_wheels.sh      # also setuptools, if the image's is missing or < 64
#
# Versions: the ones installed here, where they are (so the sitting runs what the tests ran), else the
# newest. Wheels are for the GPU image's CPython 3.12 on x86-64 Linux (pure-Python ones fit any).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(platformdirs tabulate)
[ "${SETUPTOOLS:-0}" = 1 ] && names+=(setuptools)
mkdir -p .whl
for name in "${names[@]}"; do
  version=$("$PY" -c 'import importlib.metadata as md, sys
try: print(md.version(sys.argv[1]))
except md.PackageNotFoundError: pass' "$name")
  spec=$name${version:+==$version}
  echo "== $spec"
  rm -f .whl/"$(echo "$name" | tr - _)"-*.whl .whl/"$name"-*.whl  # one version of each: two stop the install
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .whl "$spec"
done
ls -l .whl
echo "total $(du -sh .whl | cut -f1): name .whl in the run call's carry"
