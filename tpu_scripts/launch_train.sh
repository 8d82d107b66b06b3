#!/usr/bin/env bash
# Run `python -m elm_jax.train` on every worker of a TPU VM pod slice.
#
# Usage: TPU_NAME=... ZONE=... [PROJECT=...] [REPO_DIR=~/elm-jax] [SETUP=1] \
#          tpu_scripts/launch_train.sh GIN_FLAGS...
# NOTE: untested on TPU hardware (none was available); see tpu_scripts/README.md.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-central2-b}"
REPO_DIR="${REPO_DIR:-~/elm-jax}"
PROJECT_FLAG=()
if [[ -n "${PROJECT:-}" ]]; then
  PROJECT_FLAG=(--project="${PROJECT}")
fi
if [[ $# -eq 0 ]]; then
  echo "launch_train.sh: pass the gin flags of the run, e.g. --gin_file=..." >&2
  exit 2
fi

# Quote every flag for the remote shell.
REMOTE_ARGS=""
for arg in "$@"; do
  REMOTE_ARGS+=" $(printf '%q' "${arg}")"
done

SETUP_COMMANDS=""
if [[ "${SETUP:-0}" == "1" ]]; then
  SETUP_COMMANDS="cd ${REPO_DIR} && pip install -e '.[tpu]' && "
fi

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" "${PROJECT_FLAG[@]}" \
  --worker=all \
  --command="${SETUP_COMMANDS}cd ${REPO_DIR} && python -m elm_jax.train --gin.MULTIPROCESS=True ${REMOTE_ARGS}"
