"""Rebuild docs/benchmarks.md from its header and the sections in benchmarks/results/.

The header is everything in docs/benchmarks.md before the first `## ` heading; the
sections follow in SECTION_ORDER, each copied unchanged from benchmarks/results/.

Usage: python benchmarks/assemble_docs.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"
SECTION_ORDER = ("demo", "t5_train_step", "trainer_throughput", "adapter_vs_full",
                 "input_pipeline", "scorer", "retrieval")


def main() -> int:
  text = DOC.read_text(encoding="utf-8")
  header = text[:text.index("\n## ") + 1] if "\n## " in text else text
  missing = [name for name in SECTION_ORDER if not (RESULTS / f"{name}.md").is_file()]
  if missing:
    print(f"Missing result files in {RESULTS}: {', '.join(missing)}; run "
          f"benchmarks/run_all.sh {' '.join(missing)} first.", file=sys.stderr)
    return 1
  sections = [(RESULTS / f"{name}.md").read_text(encoding="utf-8").strip() + "\n"
              for name in SECTION_ORDER]
  DOC.write_text(header.rstrip("\n") + "\n\n\n" + "\n".join(sections), encoding="utf-8")
  print(f"Wrote {DOC} ({len(sections)} sections).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
