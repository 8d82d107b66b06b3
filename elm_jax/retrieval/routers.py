"""Routers: from the nearest library entries of Q queries to the expert that answers.

The method's rule (`route_top1_vote`): each query votes for the expert of its
nearest library entry and the expert with most votes answers the whole prompt.
Ties go to the higher summed similarity of the votes, then to the lexicographically
smallest expert id; a decision records that a tie happened and how it was broken.
"""

import csv
import dataclasses
import json
import os
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Neighbor:
  """One nearest library entry of a query."""
  row: int
  expert: str
  similarity: float


@dataclasses.dataclass(frozen=True)
class RoutingDecision:
  """The expert chosen for a set of queries, with the evidence for it.

  Attributes:
    expert: the chosen expert id.
    votes: expert id -> votes (counts, or summed similarities when weighted), highest
      first; experts without votes are left out.
    margin: the winner's share of the votes minus the runner-up's, in [0, 1].
    tie: whether several experts had the winner's vote total.
    tied_experts: those experts, when `tie`.
    tie_break: how the tie was broken (`similarity`, `id`), else None.
    nearest: for the first few queries, their nearest entries.
    per_query: for per-instance routing, the expert of each query; else empty.
    method: the router's name.
  """
  expert: str
  votes: dict[str, float]
  margin: float
  tie: bool = False
  tied_experts: tuple[str, ...] = ()
  tie_break: str | None = None
  nearest: tuple[tuple[Neighbor, ...], ...] = ()
  per_query: tuple[str, ...] = ()
  method: str = "top1_vote"

  def to_json(self) -> dict:
    record = dataclasses.asdict(self)
    record["nearest"] = [[dataclasses.asdict(n) for n in row] for row in self.nearest]
    return record


def _nearest(scores, indices, row_expert, expert_ids, show):
  return tuple(
      tuple(Neighbor(int(r), expert_ids[int(row_expert[r])], float(s))
            for s, r in zip(scores[q], indices[q]))
      for q in range(min(show, len(indices))))


def _decide(votes: np.ndarray, similarity: np.ndarray, expert_ids: Sequence[str]):
  """Returns (winner index, tied indices, tie_break) for per-expert vote totals."""
  best = votes.max()
  tied = [e for e in range(len(expert_ids)) if votes[e] == best]
  if len(tied) == 1:
    return tied[0], (), None
  best_similarity = max(similarity[e] for e in tied)
  by_similarity = [e for e in tied if similarity[e] == best_similarity]
  if len(by_similarity) == 1:
    return by_similarity[0], tuple(tied), "similarity"
  return min(by_similarity, key=lambda e: expert_ids[e]), tuple(tied), "id"


def _decision(votes, similarity, expert_ids, *, method, nearest, per_query=()):
  winner, tied, tie_break = _decide(votes, similarity, expert_ids)
  total = votes.sum()
  shares = np.sort(votes)[::-1] / total if total > 0 else np.zeros(len(votes))
  margin = float(shares[0] - shares[1]) if len(shares) > 1 else float(shares[0])
  order = sorted((e for e in range(len(expert_ids)) if votes[e] > 0),
                 key=lambda e: (-votes[e], -similarity[e], expert_ids[e]))
  return RoutingDecision(
      expert=expert_ids[winner], votes={expert_ids[e]: float(votes[e]) for e in order},
      margin=margin, tie=bool(tied), tied_experts=tuple(expert_ids[e] for e in tied),
      tie_break=tie_break, nearest=nearest, per_query=tuple(per_query), method=method)


def route_top_k_vote(scores: np.ndarray, indices: np.ndarray, *, row_expert: np.ndarray,
                     expert_ids: Sequence[str], k: int | None = None,
                     weighted: bool = False, show: int = 3) -> RoutingDecision:
  """Votes from each query's k nearest entries (k=1 is the method's rule).

  Args:
    scores, indices: [q, >=k] nearest entries per query, best first (`Retriever.search`).
    row_expert: int [rows], the expert index of each library row.
    expert_ids: the expert ids that `row_expert` indexes.
    k: how many neighbors vote; defaults to all columns given.
    weighted: each vote counts its similarity instead of 1.
    show: how many queries' neighbors to record in the decision.
  """
  scores, indices = np.asarray(scores), np.asarray(indices)
  k = indices.shape[1] if k is None else k
  if not 0 < k <= indices.shape[1]:
    raise ValueError(f"k must be in [1, {indices.shape[1]}], got {k}.")
  experts = np.asarray(row_expert)[indices[:, :k]]  # [q, k]
  votes = np.zeros(len(expert_ids), np.float64)
  similarity = np.zeros(len(expert_ids), np.float64)
  np.add.at(votes, experts.ravel(), scores[:, :k].ravel() if weighted else 1.0)
  np.add.at(similarity, experts.ravel(), scores[:, :k].ravel())
  method = "top1_vote" if k == 1 else f"top{k}_vote" + ("_weighted" if weighted else "")
  return _decision(votes, similarity, expert_ids, method=method,
                   nearest=_nearest(scores, indices, row_expert, expert_ids, show))


def route_top1_vote(scores: np.ndarray, indices: np.ndarray, *, row_expert: np.ndarray,
                    expert_ids: Sequence[str], show: int = 3) -> RoutingDecision:
  """The method's rule: each query votes for the expert of its nearest entry."""
  return route_top_k_vote(scores, indices, row_expert=row_expert, expert_ids=expert_ids,
                          k=1, show=show)


def route_per_instance(scores: np.ndarray, indices: np.ndarray, *, row_expert: np.ndarray,
                       expert_ids: Sequence[str], show: int = 3) -> RoutingDecision:
  """Gives each query the expert of its own nearest entry (`per_query`).

  `expert` is the most frequent of them, chosen as in `route_top1_vote`.
  """
  decision = route_top1_vote(scores, indices, row_expert=row_expert,
                             expert_ids=expert_ids, show=show)
  per_query = tuple(expert_ids[int(e)] for e in np.asarray(row_expert)[indices[:, 0]])
  return dataclasses.replace(decision, per_query=per_query, method="per_instance")


def route_uniform(expert_ids: Sequence[str], *, mode: str = "all",
                  seed: int = 0) -> RoutingDecision:
  """Baselines: `all` spreads equal weight over every expert (for merging all of them;
  `expert` is the first id in sorted order), `random` picks one expert with `seed`."""
  if not expert_ids:
    raise ValueError("The library has no experts.")
  if mode == "all":
    ids = sorted(expert_ids)
    return RoutingDecision(expert=ids[0], votes={e: 1.0 / len(ids) for e in ids},
                           margin=0.0, tie=len(ids) > 1, tied_experts=tuple(ids),
                           tie_break="id" if len(ids) > 1 else None, method="uniform_all")
  if mode == "random":
    choice = sorted(expert_ids)[int(np.random.default_rng(seed).integers(len(expert_ids)))]
    return RoutingDecision(expert=choice, votes={choice: 1.0}, margin=1.0,
                           method="uniform_random")
  raise ValueError(f"Unknown uniform mode {mode!r}; expected 'all' or 'random'.")


def load_results_matrix(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
  """Reads an expert-by-prompt accuracy matrix: returns {expert: {prompt: accuracy}}.

  Accepted layouts: JSON `{expert: {prompt: acc}}`; JSON `{"experts": [...],
  "prompts": [...], "accuracy": [[...]]}` with one row per expert; CSV whose header
  is `expert,<prompt>,...` and whose rows are `<expert>,<acc>,...`. Empty cells and
  JSON nulls mean "not measured".
  """
  path = str(path)
  if path.endswith(".csv"):
    matrix: dict[str, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.reader(f)
      header = next(reader, None)
      if not header or len(header) < 2:
        raise ValueError(f"{path}: expected a header row `expert,<prompt>,...`.")
      for line, row in enumerate(reader, 2):
        if len(row) != len(header):
          raise ValueError(f"{path}, line {line}: {len(row)} cells, header has "
                           f"{len(header)}.")
        matrix[row[0]] = {p: float(v) for p, v in zip(header[1:], row[1:]) if v != ""}
    return matrix
  with open(path, encoding="utf-8") as f:
    raw = json.load(f)
  if isinstance(raw, dict) and {"experts", "prompts", "accuracy"} <= set(raw):
    experts, prompts, values = raw["experts"], raw["prompts"], raw["accuracy"]
    if len(values) != len(experts) or any(len(r) != len(prompts) for r in values):
      raise ValueError(f"{path}: 'accuracy' must be [{len(experts)} experts] x "
                       f"[{len(prompts)} prompts].")
    return {e: {p: float(v) for p, v in zip(prompts, row) if v is not None}
            for e, row in zip(experts, values)}
  if isinstance(raw, dict) and all(isinstance(v, dict) for v in raw.values()):
    return {e: {p: float(v) for p, v in row.items() if v is not None}
            for e, row in raw.items()}
  raise ValueError(f"{path}: not an expert-by-prompt matrix (see load_results_matrix).")


def route_oracle(matrix: dict[str, dict[str, float]], prompt: str, *,
                 expert_ids: Sequence[str] | None = None) -> RoutingDecision:
  """The oracle: the expert with the best measured accuracy on `prompt`.

  Ties go to the lexicographically smallest id. `votes` holds the accuracies and
  `margin` is the accuracy difference to the runner-up.
  """
  candidates = {e: row[prompt] for e, row in matrix.items()
                if prompt in row and (expert_ids is None or e in expert_ids)}
  if not candidates:
    prompts = sorted({p for row in matrix.values() for p in row})
    raise KeyError(f"No expert has a measured accuracy on prompt {prompt!r}; the "
                   f"matrix has {len(prompts)} prompts, e.g. {prompts[:5]}.")
  ids = sorted(candidates)
  accuracy = np.array([candidates[e] for e in ids])
  winner, tied, tie_break = _decide(accuracy, np.zeros(len(ids)), ids)
  ranked = sorted(ids, key=lambda e: (-candidates[e], e))
  second = candidates[ranked[1]] if len(ranked) > 1 else 0.0
  return RoutingDecision(expert=ids[winner], votes={e: candidates[e] for e in ranked},
                         margin=float(candidates[ids[winner]] - second), tie=bool(tied),
                         tied_experts=tuple(ids[e] for e in tied),
                         tie_break=tie_break, method="oracle")
