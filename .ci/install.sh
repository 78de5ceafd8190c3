#!/usr/bin/env bash
# Create .venv and install gpupipe with the exact versions in constraints.txt (CPU build of
# torch). Add the GPU extras on a CUDA 13 machine with: GPUPIPE_EXTRAS=dev,gpu bash .ci/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${GPUPIPE_EXTRAS:-dev}
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24"
# torch first, pinned to the CPU build, so no resolver step pulls the CUDA wheels
.venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
# A real Triton server for the Python-backend tests (tests/integration/test_triton_python_backend.py):
# the tritonserver binary bundled in nvidia-pytriton, without its dependencies (nothing imports
# the package), and the NumPy 1.x its Python-backend stub is built against, in a directory of its
# own that the test runs the server in
.venv/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
.venv/bin/python -m pip install -q --no-deps --upgrade --target .venv/triton-stub-site "numpy==1.26.4"
echo "installed: $(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gpupipe"))') into .venv"
