#!/usr/bin/env bash
# The test suite on a fresh machine: set up .venv, build with the C tests, run ctest and pytest.
# MOQAE_CMAKE_ARGS adds CMake options (CI sets -DMOQAE_FATAL_WARNINGS=ON).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/venv.sh requirements-test.txt
# shellcheck disable=SC2086
scripts/build.sh -DMOQAE_BUILD_TESTS=ON ${MOQAE_CMAKE_ARGS:-}
(cd build && ctest --output-on-failure -j 2)
# the Python package (cffi module + tools) into .venv, built through the same CMakeLists.txt
.venv/bin/python -m pip install -q --no-build-isolation -e . -Cbuild-dir=build-python
MOQAE_BIN_DIR="$PWD/build" .venv/bin/python -m pytest -q tests "$@"
