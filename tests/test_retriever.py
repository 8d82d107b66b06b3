"""The JAX retriever against a brute-force numpy reference."""

import jax
import numpy as np
import pytest

from elm_jax.retrieval import retriever as retriever_lib


def _integer_data(rows, dim, queries, seed):
  """Small-integer vectors: products are exact in float32 and ties are frequent."""
  rng = np.random.default_rng(seed)
  keys = rng.integers(-2, 3, size=(rows, dim)).astype(np.float32)
  return rng.integers(-2, 3, size=(queries, dim)).astype(np.float32), keys


def _normal_data(rows, dim, queries, seed):
  rng = np.random.default_rng(seed)
  keys = rng.normal(size=(rows, dim)).astype(np.float32)
  keys /= np.linalg.norm(keys, axis=1, keepdims=True)
  return rng.normal(size=(queries, dim)).astype(np.float32), keys


def test_numpy_reference_breaks_ties_by_row():
  keys = np.array([[1.0], [2.0], [2.0], [1.0], [2.0]], np.float32)
  scores, indices = retriever_lib.numpy_top_k(np.ones((1, 1), np.float32), keys, 4)
  assert indices.tolist() == [[1, 2, 4, 0]]
  assert scores.tolist() == [[2.0, 2.0, 2.0, 1.0]]


@pytest.mark.parametrize("rows,chunk_size,block_size,k", [
    (1, 64, None, 1),        # one row
    (37, 8, None, 5),        # chunks of 8 rows, last one partial
    (1003, 64, None, 10),    # many chunks
    (1003, 100, None, 7),    # chunk size not a multiple of the block size
    (1003, 4096, None, 10),  # one chunk larger than the library
    (1003, 64, 1, 10),       # one row per block
    (1003, 96, 3, 10),       # blocks of 3 rows
    (40, 40, 8, 10),         # k larger than the number of blocks (5): all rescored
    (5000, 512, 64, 33),     # k blocks of 64 rows, many ties between blocks
])
def test_exact_matches_numpy_with_ties(rows, chunk_size, block_size, k):
  queries, keys = _integer_data(rows, 11, 9, seed=rows)
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys, k)
  retriever = retriever_lib.Retriever(keys, chunk_size=chunk_size, block_size=block_size)
  scores, indices = retriever.search(queries, k)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_exact_matches_numpy_on_random_vectors():
  queries, keys = _normal_data(5000, 48, 32, seed=3)
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys, 10)
  scores, indices = retriever_lib.exact_top_k(queries, keys, 10, chunk_size=512)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_allclose(scores, expected_scores, atol=1e-5)


@pytest.mark.parametrize("rows,chunk_size", [(1003, 32), (61, 4096), (4099, 256)])
def test_sharded_matches_numpy(rows, chunk_size):
  assert len(jax.devices()) == 8
  mesh = retriever_lib.rows_mesh()
  queries, keys = _integer_data(rows, 13, 6, seed=rows + 1)
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys, 8)
  retriever = retriever_lib.Retriever(keys, chunk_size=chunk_size, mesh=mesh)
  assert retriever.layout.shards == 8
  assert retriever.keys.sharding.spec[0] == "rows"
  scores, indices = retriever.search(queries, 8)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_sharded_k_above_rows_per_device():
  # 8 devices of 16 rows each, and k = 50 of 100 rows: no device alone has k rows.
  queries, keys = _integer_data(100, 7, 3, seed=9)
  retriever = retriever_lib.Retriever(keys, chunk_size=16, mesh=retriever_lib.rows_mesh())
  assert retriever.layout.chunks_per_shard * retriever.layout.chunk_size < 50
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys, 50)
  scores, indices = retriever.search(queries, 50)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_float16_keys_match_numpy_on_the_same_values():
  queries, keys = _integer_data(300, 9, 4, seed=5)
  keys16 = keys.astype(np.float16)
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys16, 6)
  scores, indices = retriever_lib.exact_top_k(queries, keys16, 6, chunk_size=64)
  np.testing.assert_array_equal(indices, expected_indices)
  np.testing.assert_array_equal(scores, expected_scores)


def test_approximate_recall_is_reported():
  queries, keys = _normal_data(3000, 32, 16, seed=7)
  retriever = retriever_lib.Retriever(keys, chunk_size=1024)
  value = retriever_lib.approximate_recall(queries, retriever, 10, recall_target=0.9)
  assert 0.9 <= value <= 1.0


def test_recall_counts_overlap():
  assert retriever_lib.recall(np.array([[1, 2], [3, 4]]), np.array([[2, 9], [4, 3]])) == 0.75


def test_equal_block_maxima_keep_the_lower_rows():
  # Every block has the same best score, so only the first k blocks' rows may win.
  keys = np.tile(np.array([[3.0], [1.0], [2.0], [0.0]], np.float32), (50, 1))
  queries = np.ones((2, 1), np.float32)
  retriever = retriever_lib.Retriever(keys, chunk_size=16, block_size=4)
  scores, indices = retriever.search(queries, 6)
  expected_scores, expected_indices = retriever_lib.numpy_top_k(queries, keys, 6)
  np.testing.assert_array_equal(indices, expected_indices)
  assert indices[0].tolist() == [0, 4, 8, 12, 16, 20]
  np.testing.assert_array_equal(scores, expected_scores)


def test_padding_rows_never_win_over_negative_scores():
  # Padding rows are zero vectors. With all real scores negative they must still lose.
  keys = -np.ones((37, 4), np.float32)
  keys[5] = -0.5
  retriever = retriever_lib.Retriever(keys, chunk_size=16, block_size=8)
  assert retriever.layout.padded_rows > 37
  scores, indices = retriever.search(np.ones((1, 4), np.float32), 37)
  assert indices[0, 0] == 5
  assert sorted(indices[0].tolist()) == list(range(37))
  assert (scores < 0).all()


def test_automatic_block_size_grows_with_the_library():
  sizes = [retriever_lib.auto_block_size(rows, 10, 384) for rows in (1000, 300_000, 3_000_000)]
  assert sizes == sorted(sizes)
  assert sizes[0] == 8
  assert sizes[-1] == 32
  queries, keys = _integer_data(3000, 5, 3, seed=2)
  retriever = retriever_lib.Retriever(keys, chunk_size=96)
  assert retriever.layout.chunk_size % retriever.block_for(10) == 0


def test_block_larger_than_chunk_is_rejected():
  with pytest.raises(ValueError, match="block_size in"):
    retriever_lib.Retriever(np.ones((10, 3), np.float32), chunk_size=8, block_size=16)


def test_non_finite_keys_are_rejected():
  keys = np.ones((10, 3), np.float32)
  keys[7, 1] = np.nan
  with pytest.raises(ValueError, match="row 7"):
    retriever_lib.Retriever(keys)


def test_invalid_k_is_rejected():
  queries, keys = _integer_data(10, 4, 2, seed=0)
  retriever = retriever_lib.Retriever(keys)
  with pytest.raises(ValueError, match="k must be in"):
    retriever.search(queries, 11)


def test_expert_max_similarity_matches_numpy():
  queries, keys = _normal_data(700, 16, 5, seed=11)
  row_expert = np.random.default_rng(0).integers(0, 6, size=700).astype(np.int32)
  actual = retriever_lib.expert_max_similarity(queries, keys, row_expert, 6, chunk_size=128)
  scores = queries @ keys.T
  expected = np.stack([scores[:, row_expert == e].max(axis=1) for e in range(6)], axis=1)
  np.testing.assert_allclose(actual, expected, atol=1e-5)
