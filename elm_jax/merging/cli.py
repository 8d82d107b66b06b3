"""`elm-jax merge`: average the trained parameters of several experts.

  elm-jax merge --experts DIR1 DIR2 [DIR3 ...] --output DIR [--weights W1 W2 ...]
"""

import argparse
import sys
from typing import Sequence

from absl import logging

from elm_jax.checkpoints import experts as expert_files
from elm_jax.merging import merge


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="elm-jax merge",
      description="Merge experts of one base into a new expert by the (weighted) mean of "
      "their trained parameters.")
  parser.add_argument("--experts", nargs="+", required=True, metavar="DIR",
                      help="expert folders (each with expert.json and params.safetensors)")
  parser.add_argument("--output", required=True, metavar="DIR",
                      help="folder to write the merged expert to; must not exist unless "
                      "--overwrite")
  parser.add_argument("--weights", nargs="+", type=float, metavar="W",
                      help="one non-negative weight per expert, normalized to sum 1 "
                      "(default: uniform mean)")
  parser.add_argument("--id", dest="expert_id",
                      help="id of the merged expert (default: the output folder's name)")
  parser.add_argument("--lora_mode", choices=merge.LORA_MODES, default="factors",
                      help="how LoRA experts merge: average the factors, concatenate them "
                      "(exact mean update, rank k*r) or truncate the mean update by SVD")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
  try:
    metadata = merge.merge_expert_dirs(
        args.experts, args.output, expert_id=args.expert_id, weights=args.weights,
        lora_mode=args.lora_mode, overwrite=args.overwrite)
  except (expert_files.ExpertError, merge.MergeError) as e:
    print(f"elm-jax merge: {e}", file=sys.stderr)
    return 1
  logging.info("Merged %s into %s.", ", ".join(metadata.sources), args.output)
  print(f"Merged {len(metadata.sources)} experts into {args.output} (id {metadata.id}).")
  return 0


if __name__ == "__main__":
  sys.exit(main())
