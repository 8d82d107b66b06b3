#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install elm-jax into it.
#
# Usage: source scripts/setup_venv.sh [EXTRAS]
#   EXTRAS: empty for the runtime only, "test" for tests and benchmarks.
# Set ELM_JAX_VENV to use another folder than .venv at the repository root.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${ELM_JAX_VENV:-${repo_root}/.venv}"
extras="${1:-}"
python_bin="${PYTHON:-python3}"

if [[ ! -x "${venv}/bin/python" ]]; then
  echo "Creating virtual environment ${venv}"
  "${python_bin}" -m venv "${venv}"
fi
# shellcheck disable=SC1091
source "${venv}/bin/activate"

# Reinstall only when setup.py changed since the last install into this venv.
stamp="${venv}/.elm_jax_installed${extras:+_${extras}}"
if [[ ! -f "${stamp}" || "${repo_root}/setup.py" -nt "${stamp}" ]]; then
  echo "Installing elm-jax${extras:+[${extras}]} into ${venv} (a few minutes the first time)"
  python -m pip install --quiet --disable-pip-version-check --upgrade pip setuptools wheel
  python -m pip install --quiet --disable-pip-version-check -e "${repo_root}${extras:+[${extras}]}"
  touch "${stamp}"
fi
