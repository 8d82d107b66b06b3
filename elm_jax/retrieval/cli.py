"""`elm-jax retrieve`: choose the expert for unlabeled instances of target tasks.

Examples:

  elm-jax retrieve --library lib/ --task bigbench_strategyqa_score_eval
  elm-jax retrieve --library lib/ --instances target.jsonl --output choice.json
  elm-jax retrieve --library lib/ --task t1 --task t2 --heatmap similarity.png
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from elm_jax import file_io
from elm_jax.library import cli as library_cli
from elm_jax.library import instances as instances_lib
from elm_jax.library import store
from elm_jax.retrieval import plots
from elm_jax.retrieval import retriever as retriever_lib
from elm_jax.retrieval import selector as selector_lib


def _print_decision(target: str, decision, queries, samples) -> None:
  print(f"{target}: expert {decision.expert} ({decision.method}, margin "
        f"{decision.margin:.3f}{', tie broken by ' + decision.tie_break if decision.tie else ''})")
  total = sum(decision.votes.values())
  for expert, votes in list(decision.votes.items())[:10]:
    print(f"  {votes:8.2f} votes  {votes / total:6.1%}  {expert}")
  for query, neighbors in zip(queries, decision.nearest):
    print(f"  query: {query.input[:100]!r}")
    for n in neighbors[:3]:
      print(f"    {n.similarity:.3f} {n.expert}: {samples[n.row].input[:90]!r}")


def _decision_record(target, decision, queries, samples) -> dict:
  record = decision.to_json()
  record["target"] = target
  record["num_queries"] = len(queries)
  nearest = []
  for query, neighbors in zip(queries, record["nearest"]):
    for n in neighbors:
      n["text"] = samples[n["row"]].input
    nearest.append({"query": query.input, "neighbors": neighbors})
  record["nearest"] = nearest
  return record


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="elm-jax retrieve",
      description="Choose the library expert for unlabeled instances (Retrieval of "
      "Experts): each of Q queries votes for the expert of its nearest library entry.")
  parser.add_argument("--library", required=True)
  parser.add_argument("--task", action="append", default=[],
                      help="target seqio Task (repeatable); queries come from --split")
  parser.add_argument("--instances", action="append", default=[],
                      help="JSON lines file with input and optional answer_choices "
                      "(repeatable)")
  parser.add_argument("--split", default="validation", help="split of the --task Tasks")
  parser.add_argument("--num-queries", type=int, default=selector_lib.NUM_QUERIES,
                      help="Q, unlabeled instances sampled per target")
  parser.add_argument("--seed", type=int, default=0, help="query sampling seed")
  parser.add_argument("--router", choices=selector_lib.ROUTERS, default="top1_vote")
  parser.add_argument("--k", type=int, default=5, help="neighbors per query (top-k routers)")
  parser.add_argument("--show", type=int, default=3, help="queries whose neighbors print")
  parser.add_argument("--max-scan", type=int, help="read at most this many Task examples")
  parser.add_argument("--output", help="write the decisions as JSON here")
  parser.add_argument("--heatmap", help="write a target x expert heatmap PNG here")
  parser.add_argument("--heatmap-metric", choices=plots.METRICS, default="vote_share")
  parser.add_argument("--model-dir", help="embedding model folder (default: fetched)")
  parser.add_argument("--shard", action="store_true",
                      help="split the library rows over all local JAX devices. On a "
                      "CPU, start with XLA_FLAGS='--xla_force_host_platform_device_count"
                      "=CORES --xla_cpu_multi_thread_eigen=false' for one device per core")
  args = parser.parse_args(argv)

  targets = list(args.task) + list(args.instances)
  if not targets:
    parser.error("give at least one --task or --instances")
  try:
    library = store.Library(args.library)
    embedder = library_cli.build_library_embedder(library.manifest, args.model_dir)
    mesh = retriever_lib.rows_mesh() if args.shard else None
    selector = selector_lib.ExpertSelector(library, embedder=embedder, mesh=mesh)
    samples = library.load_samples()

    records, profiles = [], []
    for target in targets:
      if target in args.instances:
        instances = instances_lib.read_jsonl(target)
      else:
        instances = instances_lib.task_instances(target, args.split, limit=args.max_scan)
      queries = selector_lib.sample_queries(instances, args.num_queries, args.seed)
      vectors = selector.embed(queries)
      decision = selector.route(vectors, router=args.router, k=args.k, show=args.show)
      _print_decision(target, decision, queries, samples)
      records.append(_decision_record(target, decision, queries, samples))
      if args.heatmap:
        profiles.append(selector.profile(vectors)[args.heatmap_metric])
  except (store.LibraryError, instances_lib.InvalidIdentifierError, ValueError,
          FileNotFoundError) as e:
    print(f"elm-jax retrieve: {e}", file=sys.stderr)
    return 1

  if args.output:
    output = {"library": str(library.root), "generation": library.generation,
              "router": args.router, "seed": args.seed, "decisions": records}
    file_io.write_text_atomic(args.output,
                              json.dumps(output, indent=1, ensure_ascii=False) + "\n")
    print(f"Wrote {args.output}.")
  if args.heatmap:
    labels = [Path(t).name if t in args.instances else t for t in targets]
    plots.plot_heatmap(np.stack(profiles), targets=labels,
                       experts=selector.index.expert_ids, output=args.heatmap,
                       metric=args.heatmap_metric)
    print(f"Wrote {args.heatmap}.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
