"""Nearest library entries by inner product: exact top-k in JAX, chunked and sharded.

Search runs in two passes over each device's rows:

1. Block maxima. The rows are split into chunks of a few thousand rows, and each
   chunk into blocks of 8 to 32 rows (more for larger libraries). A `lax.scan`
   over the chunks computes a [chunk, queries] matrix product and keeps only each
   block's largest score, so the scores never leave the cache and memory beyond the
   keys is one chunk of scores plus `queries * rows / block` maxima.
2. Rescoring. `lax.top_k` over the block maxima picks k blocks per query. The exact
   top-k lies inside them: a row outside them is beaten by the maxima of k chosen
   blocks. Those k * block rows are gathered, scored again and ranked.

Per-device results are merged with one more `lax.top_k`.

Ties go to the lower row index everywhere: `lax.top_k` keeps the lower index first
among equal values, the blocks are ranked in row order, and every candidate list is
in increasing row order, so the result equals `numpy_top_k`, the reference.
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Measured on a 2-core CPU (benchmarks/retrieval.py): chunks of 2k-8k rows keep the
# product's output in cache; 64k-row chunks ran at half the speed.
DEFAULT_CHUNK_SIZE = 4096
# Chunks are whole multiples of this many rows, so any block size up to it fits.
_ROW_ALIGNMENT = 32


def auto_block_size(rows: int, k: int, dim: int) -> int:
  """Returns the rows per block that balance the two passes' extra work.

  Pass 1 leaves `rows / block` maxima per query for `lax.top_k`, and pass 2 gathers
  `k * block` rows of `dim` values per query. Counting a maximum as five gathered
  values (a rough fit to timings on a 2-core CPU), the two meet at
  sqrt(5 * rows / (k * dim)). The block size changes speed only, never the result.
  """
  best = math.sqrt(5 * rows / (k * dim))
  return int(min(_ROW_ALIGNMENT, max(8, 2 ** round(math.log2(max(best, 1))))))


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


def _search_rows(queries, keys, base, *, num_rows, k, block, layout, approximate,
                 recall_target, precision):
  """Top-k over one device's `keys` [rows, d], whose first row has global index `base`.

  Returns (scores [q, k], global row indices [q, k]); padding rows score -inf.
  """
  num_queries, dim = queries.shape
  chunk = layout.chunk_size

  def block_maxima(_, inputs):
    chunk_keys, start = inputs
    scores = jax.lax.dot_general(
        chunk_keys.astype(jnp.float32), queries, (((1,), (1,)), ((), ())),
        precision=precision, preferred_element_type=jnp.float32)  # [chunk, q]
    rows = base + start + jnp.arange(chunk, dtype=jnp.int32)
    scores = jnp.where(rows[:, None] < num_rows, scores, -jnp.inf)
    return None, scores.reshape(chunk // block, block, num_queries).max(axis=1)

  starts = jnp.arange(layout.chunks_per_shard, dtype=jnp.int32) * chunk
  _, maxima = jax.lax.scan(
      block_maxima, None, (keys.reshape(layout.chunks_per_shard, chunk, dim), starts))
  maxima = maxima.reshape(-1, num_queries).T  # [q, blocks], blocks in row order
  num_blocks = min(k, maxima.shape[1])
  if approximate:
    _, blocks = jax.lax.approx_max_k(maxima, num_blocks, recall_target=recall_target)
  else:
    _, blocks = jax.lax.top_k(maxima, num_blocks)
  blocks = jnp.sort(blocks, axis=1)  # candidates in increasing row order
  local_rows = (blocks[:, :, None] * block
                + jnp.arange(block, dtype=jnp.int32)).reshape(num_queries, -1)
  candidates = keys[local_rows].astype(jnp.float32)  # [q, num_blocks * block, d]
  scores = jnp.einsum("qd,qrd->qr", queries, candidates, precision=precision,
                      preferred_element_type=jnp.float32)
  rows = base + local_rows
  scores = jnp.where(rows < num_rows, scores, -jnp.inf)
  # A device's share of a sharded library may be smaller than k. The merge across
  # devices still receives at least k rows, because all devices together hold them.
  top, position = jax.lax.top_k(scores, min(k, scores.shape[1]))
  return top, jnp.take_along_axis(rows, position, axis=1)


@dataclasses.dataclass(frozen=True)
class _Layout:
  shards: int
  chunk_size: int
  chunks_per_shard: int

  @property
  def padded_rows(self) -> int:
    return self.shards * self.chunks_per_shard * self.chunk_size


def _layout(num_rows: int, shards: int, chunk_size: int, alignment: int) -> _Layout:
  """Splits rows into equal chunks of about `chunk_size` rows, multiples of `alignment`.

  When some chunk count near the smallest one divides the rows exactly, that count is
  used, so no padded copy of the keys is needed (3M rows: 750 chunks of 4,000).
  """
  block = alignment
  per_shard = math.ceil(num_rows / shards)
  fewest = max(1, math.ceil(per_shard / chunk_size))
  if per_shard * shards == num_rows:
    for count in range(fewest, fewest + fewest // 4 + 16):
      chunk = per_shard // count
      if chunk * count == per_shard and chunk % block == 0:
        return _Layout(shards, chunk, count)
  blocks_per_chunk = math.ceil(math.ceil(per_shard / fewest) / block)
  chunk = blocks_per_chunk * block
  return _Layout(shards, chunk, math.ceil(per_shard / chunk))


class Retriever:
  """Exact (or approximate) top-k search over a fixed library matrix.

  Args:
    keys: [rows, dim] library embeddings (float32 or float16), all finite.
    chunk_size: rows scored per step of the scan on each device (about; chunks are
      whole blocks).
    block_size: rows summarized by one maximum; a search rescores k blocks per query.
      None picks 8 to 32 by `auto_block_size` for each k.
    mesh: shard the rows over `axis_name` of this mesh; None uses one device.
    precision: matrix product precision; HIGHEST keeps float32 on accelerators.
  """

  def __init__(self, keys: np.ndarray, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               block_size: int | None = None, mesh: Mesh | None = None,
               axis_name: str = "rows", precision: Any = jax.lax.Precision.HIGHEST):
    keys = np.asarray(keys)
    if keys.ndim != 2 or keys.shape[0] == 0:
      raise ValueError(f"keys must be a non-empty [rows, dim] matrix, got {keys.shape}.")
    if not np.issubdtype(keys.dtype, np.floating):
      raise ValueError(f"keys must be floating point, got {keys.dtype}.")
    if not np.isfinite(keys).all():
      bad = int(np.flatnonzero(~np.isfinite(keys).all(axis=1))[0])
      raise ValueError(f"keys row {bad} contains NaN or infinity; re-embed that entry.")
    if chunk_size < 1 or (block_size is not None and not 0 < block_size <= chunk_size):
      raise ValueError(f"chunk_size must be positive and block_size in [1, chunk_size], "
                       f"got {chunk_size} and {block_size}.")
    self.num_rows, self.dim = keys.shape
    self.block_size = block_size
    self.mesh = mesh
    self.axis_name = axis_name
    self.precision = precision
    shards = mesh.shape[axis_name] if mesh is not None else 1
    self.layout = _layout(self.num_rows, shards, chunk_size,
                          block_size or min(_ROW_ALIGNMENT, chunk_size))
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

  def block_for(self, k: int) -> int:
    """Returns the rows per block that a search for k neighbors uses."""
    if self.block_size is not None:
      return self.block_size
    rows = self.layout.chunks_per_shard * self.layout.chunk_size
    return math.gcd(auto_block_size(rows, k, self.dim), self.layout.chunk_size)

  def _search_impl(self, queries, keys, *, k, approximate, recall_target):
    search = functools.partial(
        _search_rows, num_rows=self.num_rows, k=k, block=self.block_for(k),
        layout=self.layout,
        approximate=approximate, recall_target=recall_target, precision=self.precision)
    if self.mesh is None:
      return search(queries, keys, 0)

    rows_per_shard = self.layout.chunks_per_shard * self.layout.chunk_size

    def per_shard(queries, local_keys):
      base = jax.lax.axis_index(self.axis_name) * rows_per_shard
      return search(queries, local_keys, base)

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
    if not 0 < k <= self.num_rows:
      raise ValueError(f"k must be in [1, {self.num_rows}] (the number of library "
                       f"rows), got {k}.")
    scores, indices = self._search(jnp.asarray(queries), self.keys, k=k,
                                   approximate=approximate, recall_target=recall_target)
    return np.asarray(scores), np.asarray(indices)


def exact_top_k(queries: np.ndarray, keys: np.ndarray, k: int, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE,
                mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One-off exact top-k; build a Retriever to search the same keys repeatedly."""
  return Retriever(keys, chunk_size=chunk_size, mesh=mesh).search(queries, k)


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
