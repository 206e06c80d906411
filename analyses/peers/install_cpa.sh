#!/usr/bin/env bash
# Install CPA (cpa-tools 0.8.8) into its OWN virtual environment, beside torch 2.13 (CPU).
#
#   bash analyses/peers/install_cpa.sh            # venv at /work/cpa-venv
#   CPA_VENV=/some/path PYTHON=python3.11 bash analyses/peers/install_cpa.sh
#
# cpa-tools 0.8.8 declares Python < 3.11, torch <= 2.0.1 and numpy < 1.24, so a plain
# `pip install cpa-tools` is refused on our Python 3.11 / torch 2.13 stack. It does import
# and train with the pins below, installed without its declared requirements
# (--no-deps --ignore-requires-python). None of this belongs in pyro_pvae's dependencies:
# this venv is used only by analyses/peers/run_cpa.py. About 10 minutes on 2 cores.
set -euo pipefail

CPA_VENV="${CPA_VENV:-/work/cpa-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

echo "[install_cpa] venv: $CPA_VENV (python: $($PYTHON --version 2>&1))"
if [ ! -x "$CPA_VENV/bin/python" ]; then
    "$PYTHON" -m venv "$CPA_VENV"
fi
PIP=("$CPA_VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade "pip<25"

# 1. torch first, always pinned (an unpinned torch pulls gigabytes of CUDA wheels; the CPU
#    build is what this machine provides).
"${PIP[@]}" install "torch==${TORCH_VERSION}"

# 2. CPA's stack, pinned to versions that work together with torch 2.13.
CONSTRAINTS="$CPA_VENV/cpa-constraints.txt"
cat > "$CONSTRAINTS" <<CONS
torch==${TORCH_VERSION}
jax==0.4.23
jaxlib==0.4.23
numpy<2
scipy==1.12.0
anndata<0.10
pytorch-lightning<1.10,>=1.9
lightning<2.3,>=2.2
scvi-tools==0.20.3
pandas<2.2
protobuf<5
pyarrow<17
CONS
"${PIP[@]}" install -c "$CONSTRAINTS" scvi-tools==0.20.3 "lightning>=2.2,<2.3" "anndata<0.10" scanpy \
    adjustText seaborn rdkit "ray[tune]>=2.9,<2.10" mudata

# 3. ray 2.9 imports pkg_resources._vendor, which newer setuptools no longer has.
"${PIP[@]}" install -c "$CONSTRAINTS" "pyarrow<17" setuptools==70.0.0

# 4. cpa-tools itself, without its (unsatisfiable) declared requirements.
WHEELS="$(mktemp -d)"
trap 'rm -rf "$WHEELS"' EXIT
"${PIP[@]}" download --no-deps --python-version 3.10 --only-binary=:all: -d "$WHEELS" cpa-tools==0.8.8
"${PIP[@]}" install --no-deps --ignore-requires-python "$WHEELS"/cpa_tools-0.8.8-py3-none-any.whl

# 5. smoke test: CPA imports; print the versions that matter.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$CPA_VENV/bin/python" - <<'PY'
import importlib.metadata as md
import cpa  # noqa: F401
for p in ("cpa-tools", "scvi-tools", "pytorch-lightning", "lightning", "torch", "numpy", "anndata", "ray",
          "scanpy", "pandas", "scipy", "jax"):
    try:
        print(f"  {p}=={md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p}: not installed")
PY
echo "[install_cpa] done: $CPA_VENV/bin/python"
