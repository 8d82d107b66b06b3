"""The `elm-jax` command: one subcommand per entry point.

Each subcommand lives in its own module with a `main(argv) -> int` function; the
import happens only when that subcommand runs, so `elm-jax data ...` never pays for
importing the trainer.
"""

import sys
from typing import Callable, Sequence


def _train(argv: Sequence[str]) -> int:
  from elm_jax import train
  return train.main(argv)


def _eval(argv: Sequence[str]) -> int:
  from elm_jax import evaluate
  return evaluate.main(argv)


def _data(argv: Sequence[str]) -> int:
  from elm_jax.data import cli
  return cli.main(argv)


def _library(argv: Sequence[str]) -> int:
  from elm_jax.library import cli
  return cli.main(argv)


def _retrieve(argv: Sequence[str]) -> int:
  from elm_jax.retrieval import cli
  return cli.main(argv)


def _merge(argv: Sequence[str]) -> int:
  from elm_jax.merging import cli
  return cli.main(argv)


def _demo(argv: Sequence[str]) -> int:
  from elm_jax import demo
  return demo.main(argv)


SUBCOMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (_train, "train a prompt expert, a dataset expert or the multitask model"),
    "eval": (_eval, "rank-classification or generative evaluation"),
    "data": (_data, "fetch offline data and build the vocabulary"),
    "library": (_library, "create, grow and check an Expert Library"),
    "retrieve": (_retrieve, "choose an expert for unlabeled instances"),
    "merge": (_merge, "average the parameters of several experts"),
    "demo": (_demo, "run the whole method end to end on offline data"),
}


def _usage() -> str:
  lines = ["usage: elm-jax SUBCOMMAND [ARGS...]", "", "subcommands:"]
  for name, (_, help_text) in SUBCOMMANDS.items():
    lines.append(f"  {name:<10} {help_text}")
  lines.append("")
  lines.append("Run `elm-jax SUBCOMMAND --help` for the options of one subcommand.")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    import difflib
    close = difflib.get_close_matches(name, SUBCOMMANDS, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    print(f"elm-jax: unknown subcommand {name!r}.{hint}\n\n{_usage()}", file=sys.stderr)
    return 2
  handler, _ = SUBCOMMANDS[name]
  return int(handler(rest) or 0)


if __name__ == "__main__":
  sys.exit(main())
