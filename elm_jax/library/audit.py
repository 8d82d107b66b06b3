"""Leakage audit: library (or training) instances that duplicate evaluation instances.

Two tests per instance: normalized exact match of the input text (lowercase, ASCII
punctuation removed, whitespace collapsed), and cosine similarity of the embedded
texts at or above a threshold. Near duplicates include the exact ones.
"""

from typing import Any, Sequence

import numpy as np

from elm_jax.library import instances as instances_lib
from elm_jax.library.instances import Instance
from elm_jax.library.store import Library

DEFAULT_THRESHOLD = 0.95
_QUERY_BATCH = 1024


def _nearest_eval(vectors: np.ndarray, eval_vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Returns each row's best similarity and its eval index, ties to the lower index."""
  from elm_jax.retrieval import retriever as retriever_lib  # pylint: disable=g-import-not-at-top
  if len(vectors) == 0:
    return np.zeros(0, np.float32), np.zeros(0, np.int32)
  search = retriever_lib.Retriever(eval_vectors)
  scores, indices = [], []
  for start in range(0, len(vectors), _QUERY_BATCH):
    s, i = search.search(vectors[start:start + _QUERY_BATCH], 1)
    scores.append(s[:, 0])
    indices.append(i[:, 0])
  return np.concatenate(scores), np.concatenate(indices)


def find_duplicates(candidates: Sequence[Instance], eval_instances: Sequence[Instance], *,
                    candidate_vectors: np.ndarray | None, eval_vectors: np.ndarray | None,
                    threshold: float, labels: Sequence[str], max_examples: int) -> dict:
  """Compares candidates against eval instances; returns counts and examples.

  `labels[i]` names candidate i in the examples (e.g. its expert). Vectors may be None,
  which skips the similarity test.
  """
  eval_index = {}
  for i, x in enumerate(eval_instances):
    eval_index.setdefault(instances_lib.normalize_text(x.input), i)
  exact = [eval_index.get(instances_lib.normalize_text(x.input)) for x in candidates]

  if candidate_vectors is not None and eval_vectors is not None:
    similarity, nearest = _nearest_eval(candidate_vectors, eval_vectors)
  else:
    similarity = np.full(len(candidates), np.nan, np.float32)
    nearest = np.full(len(candidates), -1, np.int32)
  near = similarity >= threshold

  flagged = [i for i in range(len(candidates)) if exact[i] is not None or near[i]]
  flagged.sort(key=lambda i: (exact[i] is None, -np.nan_to_num(similarity[i])))
  examples = []
  for i in flagged[:max_examples]:
    match = exact[i] if exact[i] is not None else int(nearest[i])
    examples.append({
        "label": labels[i], "candidate_index": i, "candidate": candidates[i].input,
        "eval_index": match, "eval": eval_instances[match].input,
        "exact": exact[i] is not None,
        "similarity": None if np.isnan(similarity[i]) else float(similarity[i]),
    })
  by_label: dict[str, int] = {}
  for i in flagged:
    by_label[labels[i]] = by_label.get(labels[i], 0) + 1
  return {
      "checked": len(candidates),
      "exact_duplicates": sum(e is not None for e in exact),
      "near_duplicates": int(near.sum()),
      "flagged": len(flagged),
      "flagged_by_label": dict(sorted(by_label.items(), key=lambda kv: -kv[1])),
      "examples": examples,
  }


def audit(library: Library, eval_instances: Sequence[Instance], *, against: str,
          embedder: Any | None = None, threshold: float = DEFAULT_THRESHOLD,
          training_instances: Sequence[Instance] | None = None,
          training_label: str = "training", max_examples: int = 20) -> dict:
  """Audits the library's samples (and optionally `training_instances`).

  Args:
    library: the library whose sample instances are checked.
    eval_instances: the evaluation instances they must not duplicate.
    against: a name for the evaluation set, recorded in the report.
    embedder: the library's embedding model; None runs the exact test only.
    threshold: cosine similarity at or above which a pair is a near duplicate.
    training_instances: more instances to check, e.g. a Task's whole train split.
    max_examples: how many flagged pairs each section lists.

  Returns:
    A JSON-ready report with a `library_samples` section (and `training_instances`).
  """
  if not eval_instances:
    raise ValueError(f"No evaluation instances to audit against ({against}).")
  text_format = library.text_format
  max_length = library.manifest["embedding"]["max_length"]
  eval_vectors = None
  if embedder is not None:
    library.check_embedder(embedder)
    eval_vectors = embedder.embed([instances_lib.format_text(x, text_format)
                                   for x in eval_instances], max_length=max_length)

  samples, labels, blocks = [], [], []
  for expert_id in library.expert_ids:
    expert_samples = library.samples(expert_id)
    samples += expert_samples
    labels += [expert_id] * len(expert_samples)
    if embedder is not None:
      blocks.append(library.embeddings(expert_id))
  sample_vectors = (np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)
                    ) if embedder is not None else None
  report = {
      "library": str(library.root), "generation": library.generation,
      "against": against, "eval_instances": len(eval_instances),
      "threshold": threshold, "similarity": embedder is not None,
      "library_samples": find_duplicates(
          samples, eval_instances, candidate_vectors=sample_vectors,
          eval_vectors=eval_vectors, threshold=threshold, labels=labels,
          max_examples=max_examples),
  }
  if training_instances is not None:
    training_vectors = None
    if embedder is not None:
      training_vectors = embedder.embed(
          [instances_lib.format_text(x, text_format) for x in training_instances],
          max_length=max_length)
    report["training_instances"] = find_duplicates(
        training_instances, eval_instances, candidate_vectors=training_vectors,
        eval_vectors=eval_vectors, threshold=threshold,
        labels=[training_label] * len(training_instances), max_examples=max_examples)
  return report
