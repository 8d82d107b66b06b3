"""Retrieval of Experts end to end: sample queries, embed them, search, route."""

from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from elm_jax.library import instances as instances_lib
from elm_jax.library.instances import Instance
from elm_jax.library.store import Library
from elm_jax.retrieval import retriever as retriever_lib
from elm_jax.retrieval import routers

NUM_QUERIES = 32
ROUTERS = ("top1_vote", "topk_vote", "topk_weighted", "per_instance")


def sample_queries(instances: Sequence[Instance], num_queries: int = NUM_QUERIES,
                   seed: int = 0) -> list[Instance]:
  """Returns `num_queries` instances (all when fewer) drawn with `seed`."""
  return instances_lib.sample_instances(instances, num_queries, seed)


class ExpertSelector:
  """Chooses experts from a library for sets of unlabeled instances.

  Args:
    library: an opened Library; its embeddings are loaded and checked once.
    embedder: the library's embedding model (checked by fingerprint).
    mesh, chunk_size: passed to the Retriever.
  """

  def __init__(self, library: Library, *, embedder: Any, mesh: Mesh | None = None,
               chunk_size: int = retriever_lib.DEFAULT_CHUNK_SIZE):
    self.library = library
    self.embedder = embedder
    self.index = library.load_index(embedder=embedder)
    if self.index.embeddings.shape[0] == 0:
      raise ValueError(f"{library.root} has no experts; add some with "
                       "`elm-jax library add`.")
    self.retriever = retriever_lib.Retriever(self.index.embeddings, chunk_size=chunk_size,
                                             mesh=mesh)
    self.query_max_length = library.manifest["embedding"]["query_max_length"]

  def embed(self, queries: Sequence[Instance]) -> np.ndarray:
    texts = [instances_lib.format_text(q, self.library.text_format) for q in queries]
    return self.embedder.embed(texts, max_length=self.query_max_length)

  def select(self, instances: Sequence[Instance], *, num_queries: int = NUM_QUERIES,
             seed: int = 0, router: str = "top1_vote", k: int = 1,
             show: int = 3) -> routers.RoutingDecision:
    """Samples queries from `instances` and routes them with `router` (see ROUTERS)."""
    queries = sample_queries(instances, num_queries, seed)
    return self.route(self.embed(queries), router=router, k=k, show=show)

  def route(self, query_vectors: np.ndarray, *, router: str = "top1_vote", k: int = 1,
            show: int = 3) -> routers.RoutingDecision:
    width = 1 if router in ("top1_vote", "per_instance") else k
    width = min(width, self.retriever.num_rows)
    scores, indices = self.retriever.search(query_vectors, width)
    common = dict(row_expert=self.index.row_expert, expert_ids=self.index.expert_ids,
                  show=show)
    if router == "top1_vote":
      return routers.route_top1_vote(scores, indices, **common)
    if router == "per_instance":
      return routers.route_per_instance(scores, indices, **common)
    if router in ("topk_vote", "topk_weighted"):
      return routers.route_top_k_vote(scores, indices, k=width,
                                       weighted=router == "topk_weighted", **common)
    raise ValueError(f"Unknown router {router!r}; expected one of {ROUTERS}.")

  def profile(self, query_vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Returns per-expert `mean_top1_similarity` and `vote_share`, each float [experts]."""
    best = retriever_lib.expert_max_similarity(
        query_vectors, self.index.embeddings, self.index.row_expert,
        len(self.index.expert_ids))  # [q, experts]
    _, indices = self.retriever.search(query_vectors, 1)
    votes = np.bincount(self.index.row_expert[indices[:, 0]],
                        minlength=len(self.index.expert_ids))
    return {"mean_top1_similarity": best.mean(axis=0),
            "vote_share": votes / max(1, votes.sum())}
