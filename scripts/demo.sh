#!/usr/bin/env bash
# Run the end-to-end demo on the offline default data: `elm-jax demo` with any
# extra arguments passed through (for example --quick, --fresh, --run_dir DIR).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${repo_root}/scripts/setup_venv.sh"
cd "${repo_root}"
exec elm-jax demo "$@"
