#!/usr/bin/env bash
# Run the test suite (the default run excludes tests marked slow; pass -m slow
# to run those). Extra arguments go to pytest.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${repo_root}/scripts/setup_venv.sh" test
cd "${repo_root}"
# The offline data is fetched once into the cache and reused by later runs.
elm-jax data fetch all
python -m pytest --durations=20 "$@"
