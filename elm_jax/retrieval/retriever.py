"""Nearest library entries by inner product: exact top-k in JAX, chunked and sharded.

The library matrix is padded and split into `shards x chunks x chunk_size` rows.
Each shard (one device of the mesh axis) scans its chunks: a [queries, chunk] matrix
product, a per-chunk `lax.top_k`, and a merge with the running top-k, so memory
stays at one chunk of scores. The per-shard results are then merged once more.

Ties go to the lower row index everywhere: `lax.top_k` keeps the lower index first
among equal values, and every merge lists candidates in increasing row order, so the
result equals `numpy_top_k`, the reference.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DEFAULT_CHUNK_SIZE = 65536


def numpy_top_k(queries: np.ndarray, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Reference top-k by inner product: scores desc, then row index asc.

  Returns (scores float32 [q, k], indices int32 [q, k]).
  """
  scores = np.asarray(queries, np.float32) @ np.asarray(keys, np.float32).T  # [q, n]
  n = scores.shape[1]
  if not 0 < k <= n:
    raise ValueError(f"k must be in [1, {n}] (the number of library rows), got {k}.")
  out_scores = np.empty((scores.shape[0], k), np.float32)
  out_indices = np.empty((scores.shape[0], k), np.int32)
  for row, values in enumerate(scores):
    # Every entry at least as large as the k-th largest is a candidate; sorting the
    # candidates by (-score, index) resolves ties at the boundary.
    kth = np.partition(values, n - k)[n - k]
    candidates = np.flatnonzero(values >= kth)
    order = np.lexsort((candidates, -values[candidates]))[:k]
    out_indices[row] = candidates[order]
    out_scores[row] = values[candidates[order]]
  return out_scores, out_indices


def recall(approx_indices: np.ndarray, exact_indices: np.ndarray) -> float:
  """Returns the share of exact top-k rows that the approximate top-k also found."""
  approx_indices, exact_indices = np.asarray(approx_indices), np.asarray(exact_indices)
  if approx_indices.shape != exact_indices.shape:
    raise ValueError(f"Shapes differ: {approx_indices.shape} vs {exact_indices.shape}.")
  hits = sum(len(np.intersect1d(a, e)) for a, e in zip(approx_indices, exact_indices))
  return hits / exact_indices.size


def _merge(scores_a, indices_a, scores_b, indices_b, k):
  """Top-k of two candidate lists; every index in `a` is lower than those in `b`."""
  scores = jnp.concatenate([scores_a, scores_b], axis=1)  # [q, 2k]
  indices = jnp.concatenate([indices_a, indices_b], axis=1)
  top_scores, position = jax.lax.top_k(scores, k)
  return top_scores, jnp.take_along_axis(indices, position, axis=1)


def _scan_chunks(queries, keys, base, *, num_rows, k, chunk_size, approximate,
                 recall_target, precision, varying_axis=None):
  """Top-k over `keys` [rows, d], whose first row has global index `base`."""
  num_chunks = keys.shape[0] // chunk_size
  chunks = keys.reshape(num_chunks, chunk_size, keys.shape[1])  # [chunks, chunk, d]
  q = queries.shape[0]

  def step(carry, inputs):
    best_scores, best_indices = carry
    chunk, chunk_index = inputs
    start = base + chunk_index * chunk_size
    scores = jnp.dot(queries, chunk.astype(jnp.float32).T, precision=precision,
                     preferred_element_type=jnp.float32)  # [q, chunk]
    rows = start + jnp.arange(chunk_size, dtype=jnp.int32)
    scores = jnp.where(rows[None, :] < num_rows, scores, -jnp.inf)
    if approximate:
      top, position = jax.lax.approx_max_k(scores, k, recall_target=recall_target)
    else:
      top, position = jax.lax.top_k(scores, k)
    return _merge(best_scores, best_indices, top, rows[position], k), None

  init = (jnp.full((q, k), -jnp.inf, jnp.float32), jnp.full((q, k), -1, jnp.int32))
  if varying_axis is not None:
    # Inside shard_map the carry differs per shard; the constant init must say so.
    init = jax.lax.pcast(init, (varying_axis,), to="varying")
  (scores, indices), _ = jax.lax.scan(
      step, init, (chunks, jnp.arange(num_chunks, dtype=jnp.int32)))
  return scores, indices


@dataclasses.dataclass(frozen=True)
class _Layout:
  shards: int
  chunk_size: int
  chunks_per_shard: int

  @property
  def padded_rows(self) -> int:
    return self.shards * self.chunks_per_shard * self.chunk_size


def _layout(num_rows: int, shards: int, chunk_size: int, k: int) -> _Layout:
  """Splits rows into equal chunks of at most about `chunk_size` and at least k rows.

  When some chunk count near the smallest one divides the rows exactly (in chunks of
  a multiple of 8 rows), that count is used, so no padded copy of the keys is needed.
  """
  per_shard = math.ceil(num_rows / shards)
  fewest = max(1, math.ceil(per_shard / chunk_size))
  if per_shard * shards == num_rows:
    for count in range(fewest, fewest + 16):
      chunk = per_shard // count
      if chunk * count == per_shard and chunk % 8 == 0 and chunk >= k:
        return _Layout(shards, chunk, count)
  chunk = max(-(-math.ceil(per_shard / fewest) // 8) * 8, k)
  return _Layout(shards, chunk, math.ceil(per_shard / chunk))


class Retriever:
  """Exact (or approximate) top-k search over a fixed library matrix.

  Args:
    keys: [rows, dim] library embeddings (float32 or float16).
    chunk_size: rows scored at once per device.
    mesh: shard the rows over `axis_name` of this mesh; None uses one device.
    max_k: the largest k that `search` will be asked for (chunks hold at least k rows).
    precision: matrix product precision; HIGHEST keeps float32 on accelerators.
  """

  def __init__(self, keys: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               mesh: Mesh | None = None, axis_name: str = "rows", max_k: int = 64,
               precision: Any = jax.lax.Precision.HIGHEST):
    keys = np.asarray(keys)
    if keys.ndim != 2 or keys.shape[0] == 0:
      raise ValueError(f"keys must be a non-empty [rows, dim] matrix, got {keys.shape}.")
    self.num_rows, self.dim = keys.shape
    self.mesh = mesh
    self.axis_name = axis_name
    self.precision = precision
    shards = mesh.shape[axis_name] if mesh is not None else 1
    self.layout = _layout(self.num_rows, shards, chunk_size, min(max_k, self.num_rows))
    if self.layout.padded_rows == self.num_rows:
      padded = keys
    else:
      padded = np.zeros((self.layout.padded_rows, self.dim), keys.dtype)
      padded[:self.num_rows] = keys
    if mesh is None:
      self.keys = jax.device_put(padded)
    else:
      self.keys = jax.device_put(padded, NamedSharding(mesh, P(axis_name, None)))
    self._search = jax.jit(self._search_impl, static_argnames=("k", "approximate",
                                                               "recall_target"))

  def _search_impl(self, queries, keys, *, k, approximate, recall_target):
    layout = self.layout
    scan = functools.partial(
        _scan_chunks, num_rows=self.num_rows, k=k, chunk_size=layout.chunk_size,
        approximate=approximate, recall_target=recall_target, precision=self.precision)
    if self.mesh is None:
      return scan(queries, keys, 0)

    rows_per_shard = layout.chunks_per_shard * layout.chunk_size

    def per_shard(queries, local_keys):
      base = jax.lax.axis_index(self.axis_name) * rows_per_shard
      return scan(queries, local_keys, base, varying_axis=self.axis_name)

    # [q, shards * k], listed shard by shard, so in increasing row order.
    scores, indices = jax.shard_map(
        per_shard, mesh=self.mesh, in_specs=(P(), P(self.axis_name, None)),
        out_specs=(P(None, self.axis_name), P(None, self.axis_name)))(queries, keys)
    top, position = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(indices, position, axis=1)

  def search(self, queries: np.ndarray, k: int, *, approximate: bool = False,
             recall_target: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Returns (scores float32 [q, k], row indices int32 [q, k]), best first."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f"queries must be [q, {self.dim}], got {queries.shape}.")
    if not 0 < k <= min(self.num_rows, self.layout.chunk_size):
      raise ValueError(f"k must be in [1, {min(self.num_rows, self.layout.chunk_size)}] "
                       f"for this retriever (rows {self.num_rows}), got {k}; raise max_k.")
    scores, indices = self._search(jnp.asarray(queries), self.keys, k=k,
                                   approximate=approximate, recall_target=recall_target)
    return np.asarray(scores), np.asarray(indices)


def exact_top_k(queries: np.ndarray, keys: np.ndarray, k: int, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One-off exact top-k; build a Retriever to search the same keys repeatedly."""
  return Retriever(keys, chunk_size=chunk_size, mesh=mesh, max_k=k).search(queries, k)


def approximate_recall(queries: np.ndarray, retriever: Retriever, k: int, *,
                       recall_target: float = 0.95) -> float:
  """Returns the recall of approximate top-k (`lax.approx_max_k`) against exact top-k."""
  _, exact = retriever.search(queries, k)
  _, approx = retriever.search(queries, k, approximate=True, recall_target=recall_target)
  return recall(approx, exact)


def rows_mesh(axis_name: str = "rows", devices: Any = None) -> Mesh:
  """Returns a one-axis mesh over `devices` (default: all) for sharding library rows."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis_name,))


def expert_max_similarity(queries: np.ndarray, keys: np.ndarray, row_expert: np.ndarray,
                          num_experts: int, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                          precision: Any = jax.lax.Precision.HIGHEST) -> np.ndarray:
  """Returns float32 [q, num_experts]: each query's best similarity within each expert."""
  queries = jnp.asarray(queries, jnp.float32)
  keys = np.asarray(keys)
  row_expert = np.asarray(row_expert, np.int32)
  best = jnp.full((num_experts, queries.shape[0]), -jnp.inf, jnp.float32)

  @jax.jit
  def update(best, chunk, experts):
    scores = jnp.dot(chunk.astype(jnp.float32), queries.T, precision=precision)  # [c, q]
    return jnp.maximum(best, jax.ops.segment_max(scores, experts, num_experts))

  for start in range(0, keys.shape[0], chunk_size):
    best = update(best, keys[start:start + chunk_size], row_expert[start:start + chunk_size])
  return np.asarray(best.T)
