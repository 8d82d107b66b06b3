"""`elm-jax library create|add|remove|list|show|verify|audit`.

Examples:

  elm-jax library create lib/ --embedder minilm
  elm-jax library add lib/ experts/cosmos_qa --task p3_cosmos_qa_train --split train
  elm-jax library add lib/ experts/mine --instances train.jsonl --id mine
  elm-jax library verify lib/
  elm-jax library audit lib/ --against bigbench_strategyqa_score_eval
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from elm_jax import file_io
from elm_jax.library import instances as instances_lib
from elm_jax.library import store

EMBEDDER_KINDS = ("minilm", "hashing")


def build_library_embedder(manifest: dict, model_dir: str | None = None):
  """Rebuilds the embedder a library records (kinds `minilm` and `hashing`)."""
  from elm_jax.models import embedders  # pylint: disable=g-import-not-at-top
  recorded = manifest["embedding"]
  if recorded["kind"] not in EMBEDDER_KINDS:
    raise store.LibraryError(
        f"The library's embedder kind {recorded['kind']!r} cannot be rebuilt from the "
        f"command line (only {EMBEDDER_KINDS}); use the Python API with that embedder.")
  return embedders.build_embedder(recorded["kind"], model_dir=model_dir,
                                  max_length=recorded["max_length"], dim=recorded["dim"])


def _create(args) -> int:
  from elm_jax.models import embedders  # pylint: disable=g-import-not-at-top
  embedder = embedders.build_embedder(args.embedder, model_dir=args.model_dir,
                                      max_length=args.max_length, dim=args.dim)
  store.create(args.library, embedder_kind=embedder.kind,
               embedder_fingerprint=embedder.fingerprint, dim=embedder.dim,
               max_length=args.max_length, query_max_length=args.query_max_length,
               text_format=args.text_format, samples_per_expert=args.samples,
               seed=args.seed, dtype=args.dtype)
  print(f"Created {args.library} (embedder {embedder.kind}, S={args.samples}, "
        f"seed {args.seed}, {args.dtype}).")
  return 0


def _add(args) -> int:
  manifest = store.read_manifest(args.library)
  if args.instances:
    instances = instances_lib.read_jsonl(args.instances)
    source = str(Path(args.instances).resolve())
  else:
    instances = instances_lib.task_instances(args.task, args.split, limit=args.max_scan)
    source = f"{args.task}:{args.split}"
  embedder = build_library_embedder(manifest, args.model_dir)
  entry = store.add_expert(args.library, args.expert, instances, embedder=embedder,
                           expert_id=args.id, source=source)
  print(f"Added {entry['path']}: {entry['num_samples']} samples from {source} "
        f"(rows {entry['rows'][0]}-{entry['rows'][1] - 1}).")
  return 0


def _remove(args) -> int:
  store.remove_expert(args.library, args.id)
  print(f"Removed {args.id} from {args.library}.")
  return 0


def _list(args) -> int:
  library = store.Library(args.library)
  manifest = library.manifest
  print(f"{args.library}: generation {manifest['generation']}, "
        f"{len(library.expert_ids)} experts, embedder {manifest['embedding']['kind']} "
        f"({manifest['embedding']['fingerprint'][:12]}), text format "
        f"{manifest['text_format']}, S={manifest['samples_per_expert']}, "
        f"seed {manifest['seed']}, {manifest['dtype']}")
  for expert_id, entry in manifest["experts"].items():
    print(f"  {expert_id:<40} {entry.get('kind') or '-':<10} {entry.get('task') or '-':<40}"
          f" rows {entry['rows'][0]}-{entry['rows'][1] - 1}")
  return 0


def _show(args) -> int:
  library = store.Library(args.library)
  entry = library.entry(instances_lib.validate_id(args.id))
  expert_dir = library.expert_dir(args.id)
  with open(expert_dir / "expert.json", encoding="utf-8") as f:
    meta = json.load(f)
  record = {"entry": entry, "expert": meta,
            "samples": [x.to_json() for x in library.samples(args.id)[:args.samples]]}
  print(json.dumps(record, indent=1, ensure_ascii=False))
  return 0


def _verify(args) -> int:
  report = store.verify(args.library)
  for error in report.errors:
    print(f"ERROR {error}")
  for path in report.unreferenced:
    print(f"unreferenced (removed by the next writer): {path}")
  status = "OK" if report.ok else "FAILED"
  print(f"{status}: {report.checked} files checked, {len(report.errors)} errors.")
  return 0 if report.ok else 1


def _audit(args) -> int:
  from elm_jax.library import audit as audit_lib  # pylint: disable=g-import-not-at-top
  library = store.Library(args.library)
  eval_instances = instances_lib.load_instances(args.against, args.split,
                                                limit=args.max_scan)
  embedder = None if args.exact_only else build_library_embedder(library.manifest,
                                                                 args.model_dir)
  training = None
  if args.training:
    training = instances_lib.load_instances(args.training, args.training_split,
                                            limit=args.max_scan)
  report = audit_lib.audit(library, eval_instances, against=args.against,
                           embedder=embedder, threshold=args.threshold,
                           training_instances=training,
                           training_label=args.training or "training",
                           max_examples=args.examples)
  text = json.dumps(report, indent=1, ensure_ascii=False)
  if args.output:
    file_io.write_text_atomic(args.output, text + "\n")
  for section in ("library_samples", "training_instances"):
    if section in report:
      part = report[section]
      print(f"{section}: {part['checked']} checked, {part['exact_duplicates']} exact, "
            f"{part['near_duplicates']} near (cosine >= {args.threshold}) duplicates of "
            f"{args.against}.")
  if not args.output:
    print(text)
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="elm-jax library",
                                   description="Create, grow and check an Expert Library.")
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("create", help="create an empty library")
  p.add_argument("library")
  p.add_argument("--embedder", choices=EMBEDDER_KINDS, default="minilm")
  p.add_argument("--model-dir", help="embedding model folder (default: fetched minilm)")
  p.add_argument("--text-format", choices=instances_lib.TEXT_FORMATS,
                 default=instances_lib.DEFAULT_TEXT_FORMAT)
  p.add_argument("--samples", type=int, default=100, help="instances per expert (S)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--dtype", choices=store.DTYPES, default="float32")
  p.add_argument("--max-length", type=int, default=256, help="tokens per library entry")
  p.add_argument("--query-max-length", type=int, default=512, help="tokens per query")
  p.add_argument("--dim", type=int, default=384, help="vector size (hashing embedder)")
  p.set_defaults(handler=_create)

  p = sub.add_parser("add", help="add an expert and its sampled training instances")
  p.add_argument("library")
  p.add_argument("expert", help="expert folder (expert.json + parameters)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--task", help="seqio Task whose split is sampled")
  source.add_argument("--instances", help="JSON lines file with input, answer_choices")
  p.add_argument("--split", default="train")
  p.add_argument("--id", help="expert id (default: `id` in expert.json)")
  p.add_argument("--max-scan", type=int, help="read at most this many Task examples")
  p.add_argument("--model-dir")
  p.set_defaults(handler=_add)

  p = sub.add_parser("remove", help="remove an expert")
  p.add_argument("library")
  p.add_argument("id")
  p.set_defaults(handler=_remove)

  p = sub.add_parser("list", help="list the experts")
  p.add_argument("library")
  p.set_defaults(handler=_list)

  p = sub.add_parser("show", help="print one expert's entry, expert.json and samples")
  p.add_argument("library")
  p.add_argument("id")
  p.add_argument("--samples", type=int, default=3, help="how many samples to print")
  p.set_defaults(handler=_show)

  p = sub.add_parser("verify", help="check every file against the manifest")
  p.add_argument("library")
  p.set_defaults(handler=_verify)

  p = sub.add_parser("audit", help="find library samples that duplicate eval instances")
  p.add_argument("library")
  p.add_argument("--against", required=True, help="seqio Task name or JSON lines file")
  p.add_argument("--split", default="validation", help="split of the --against Task")
  p.add_argument("--training", help="also audit this Task's (or file's) instances")
  p.add_argument("--training-split", default="train")
  p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity")
  p.add_argument("--exact-only", action="store_true", help="skip the embedding test")
  p.add_argument("--examples", type=int, default=20, help="flagged pairs listed")
  p.add_argument("--max-scan", type=int)
  p.add_argument("--output", help="write the JSON report here")
  p.add_argument("--model-dir")
  p.set_defaults(handler=_audit)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.handler(args)
  except (store.LibraryError, instances_lib.InvalidIdentifierError, ValueError,
          FileNotFoundError) as e:
    print(f"elm-jax library {args.command}: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
