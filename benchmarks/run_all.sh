#!/usr/bin/env bash
# Run every benchmark one after another (nothing else should run meanwhile) and
# write each Markdown section to benchmarks/results/. Then
# `python benchmarks/assemble_docs.py` rebuilds docs/benchmarks.md from them.
#
# Usage: bash benchmarks/run_all.sh [NAME...]   (default: all, in the order below)
set -uo pipefail
cd "$(dirname "$0")/.."
export USE_TF=0  # transformers must not load its TensorFlow side (it needs tf-keras).
results=benchmarks/results
mkdir -p "${results}"
names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
  names=(demo t5_train_step retrieval trainer_throughput input_pipeline scorer adapter_vs_full)
fi
for name in "${names[@]}"; do
  echo "== ${name} ($(date -u +%H:%M:%S) UTC, load $(cut -d' ' -f1-3 /proc/loadavg))"
  case "${name}" in
    demo) python benchmarks/demo_runtime.py > "${results}/demo.md" ;;
    trainer_throughput) python benchmarks/trainer_throughput.py > "${results}/${name}.md" ;;
    adapter_vs_full) python benchmarks/adapter_vs_full.py > "${results}/${name}.md" ;;
    retrieval)
      # PEER_OPENBLAS_CORETYPE picks the OpenBLAS kernel of numpy and FAISS, the peers
      # (SkylakeX on AMD Zen 5, where FAISS's OpenBLAS falls back to Barcelona).
      if [[ -n "${PEER_OPENBLAS_CORETYPE:-}" ]]; then
        env -u OPENBLAS_L2_SIZE OPENBLAS_CORETYPE="${PEER_OPENBLAS_CORETYPE}" \
          python benchmarks/retrieval.py --output "${results}/${name}.md" > /dev/null
      else
        python benchmarks/retrieval.py --output "${results}/${name}.md" > /dev/null
      fi ;;
    *) python "benchmarks/${name}.py" --output "${results}/${name}.md" > /dev/null ;;
  esac
  echo "   exit $? ($(date -u +%H:%M:%S) UTC)"
done
