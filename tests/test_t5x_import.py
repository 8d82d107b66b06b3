"""T5X checkpoint import: the msgpack + zarr layout T5X writes, read back into T5."""

import dataclasses
import json
import os
import shutil

from flax import serialization
import jax
import numpy as np
import pytest

from elm_jax.checkpoints import loading
from elm_jax.checkpoints import t5x
from elm_jax.models import t5

CONFIG = t5.T5Config(vocab_size=33, d_model=12, d_kv=5, d_ff=18, num_heads=3,
                     num_encoder_layers=3, num_decoder_layers=2,
                     relative_attention_num_buckets=6, relative_attention_max_distance=18,
                     feed_forward="gated-gelu", tie_word_embeddings=False)
QUERY = "encoder/layers_0/attention/query/kernel"


def assert_trees_equal(a, b):
  flat_a, flat_b = loading.flatten_params(a), loading.flatten_params(b)
  assert sorted(flat_a) == sorted(flat_b)
  for name in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]),
                                  err_msg=name)


def adafactor_like_state(params):
  """Optimizer state shaped like T5X's Adafactor param_states (ignored on import)."""
  return jax.tree_util.tree_map(
      lambda x: {"v_row": np.ones(x.shape[:1], np.float32), "v": np.zeros(1, np.float32)},
      params)


@pytest.fixture(scope="module")
def params():
  """Random parameters of CONFIG's shapes (no model compilation needed)."""
  rng = np.random.default_rng(3)
  return loading.unflatten_params({
      name: rng.standard_normal(shape).astype(np.float32)
      for name, shape in loading.expected_shapes(CONFIG).items()})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, params):
  """A model directory with two steps: step 20 contains `params`, step 5 zeros."""
  directory = tmp_path_factory.mktemp("t5x_model")
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  t5x.write_t5x_checkpoint(directory, 5, zeros)
  # Small chunks so arrays span several zarr chunk files; one parameter inline.
  t5x.write_t5x_checkpoint(directory, 20, params, param_states=adafactor_like_state(params),
                           inline=("decoder/decoder_norm/scale",), chunk_bytes=256)
  return str(directory)


def read_msgpack(checkpoint_dir):
  with open(os.path.join(checkpoint_dir, t5x.MSGPACK_NAME), "rb") as f:
    return serialization.msgpack_restore(f.read())


def test_fixture_layout_matches_t5x(model_dir):
  checkpoint_dir = os.path.join(model_dir, "checkpoint_20")
  contents = read_msgpack(checkpoint_dir)
  assert contents["version"] == 3
  spec = contents["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  assert spec["driver"] == "zarr"
  assert spec["kvstore"]["driver"] == "file"
  # tensorstore writes the folder path with or without a trailing slash by version.
  assert spec["kvstore"]["path"].rstrip("/") == "target.encoder.layers_0.attention.query.kernel"
  assert spec["metadata"]["compressor"]["id"] == "gzip"
  assert int(contents["optimizer"]["state"]["step"]) == 20


def test_fixture_zarr_arrays_are_chunked(model_dir):
  array_dir = os.path.join(model_dir, "checkpoint_20",
                           "target.encoder.layers_0.attention.query.kernel")
  with open(os.path.join(array_dir, ".zarray")) as f:
    zarray = json.load(f)
  assert zarray["shape"] == [CONFIG.d_model, CONFIG.num_heads * CONFIG.d_kv]
  assert zarray["compressor"]["id"] == "gzip"
  assert np.prod(zarray["chunks"]) * 4 <= 256
  assert len([n for n in os.listdir(array_dir) if not n.startswith(".")]) > 1


def test_fixture_inline_parameter_is_an_array(model_dir):
  contents = read_msgpack(os.path.join(model_dir, "checkpoint_20"))
  inline = contents["optimizer"]["target"]["decoder"]["decoder_norm"]["scale"]
  assert isinstance(inline, np.ndarray)


def test_import_picks_latest_step(model_dir, params):
  _, loaded = t5x.load_t5x(model_dir, config=CONFIG)
  assert_trees_equal(loaded, params)


def test_import_named_step(model_dir, params):
  _, loaded = t5x.load_t5x(os.path.join(model_dir, "checkpoint_5"), config=CONFIG)
  assert not np.any(loaded["token_embedder"]["embedding"])


def test_import_ignores_unfinished_tmp_dir(tmp_path, params):
  t5x.write_t5x_checkpoint(tmp_path, 1, params)
  os.rename(t5x.write_t5x_checkpoint(tmp_path, 9, params), tmp_path / "checkpoint_9.tmp-123")
  assert t5x.find_checkpoint_dir(tmp_path).endswith("checkpoint_1")


def test_import_infers_config(model_dir):
  config, _ = t5x.load_t5x(model_dir)
  # The maximum distance is not stored in a checkpoint; T5's 128 is assumed.
  assert config == dataclasses.replace(CONFIG, relative_attention_max_distance=128)


def test_import_into_scanned_model(model_dir, params):
  scanned = dataclasses.replace(CONFIG, scan_layers=True)
  _, loaded = t5x.load_t5x(model_dir, config=scanned)
  assert_trees_equal(loaded, t5.stack_layers(params))


def test_import_scanned_checkpoint(tmp_path, params):
  # T5X's scalable_t5 stacks layers on axis 1 (`param_scan_axis`).
  stacked = jax.tree_util.tree_map(lambda x: np.moveaxis(np.asarray(x), 0, 1),
                                   {k: v["layers"] for k, v in t5.stack_layers(params).items()
                                    if k in ("encoder", "decoder")})
  scanned_params = {k: dict(v) for k, v in params.items()}
  for stack in ("encoder", "decoder"):
    scanned_params[stack] = {k: v for k, v in params[stack].items()
                             if not k.startswith("layers_")}
    scanned_params[stack]["layers"] = stacked[stack]
  t5x.write_t5x_checkpoint(tmp_path, 1, scanned_params)
  _, loaded = t5x.load_t5x(tmp_path, config=CONFIG)
  assert_trees_equal(loaded, params)


def test_import_logits_equal_source_model(model_dir, params):
  config, loaded = t5x.load_t5x(model_dir, config=CONFIG)
  tokens = np.array([[4, 5, 6, 1, 0], [7, 8, 9, 10, 1]])
  apply = jax.jit(t5.T5(config).apply)
  np.testing.assert_array_equal(np.asarray(apply({"params": loaded}, tokens, tokens)),
                                np.asarray(apply({"params": params}, tokens, tokens)))


def test_load_model_detects_t5x_dir(model_dir, params):
  config, loaded = loading.load_model(model_dir, config=CONFIG)
  assert config == CONFIG
  assert_trees_equal(loaded, params)


def test_spec_path_outside_checkpoint_rejected(tmp_path, params):
  checkpoint_dir = t5x.write_t5x_checkpoint(tmp_path, 1, params)
  contents = read_msgpack(checkpoint_dir)
  spec = contents["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
  spec["kvstore"]["path"] = "../elsewhere"
  with open(os.path.join(checkpoint_dir, t5x.MSGPACK_NAME), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  with pytest.raises(loading.CheckpointError, match="not a relative path inside"):
    t5x.load_t5x(tmp_path, config=CONFIG)


def test_missing_zarr_array_named(tmp_path, params):
  checkpoint_dir = t5x.write_t5x_checkpoint(tmp_path, 1, params)
  shutil.rmtree(os.path.join(checkpoint_dir, "target." + QUERY.replace("/", ".")))
  with pytest.raises(loading.CheckpointError, match=QUERY):
    t5x.load_t5x(tmp_path, config=CONFIG)


def test_no_checkpoint_found(tmp_path):
  with pytest.raises(loading.CheckpointError, match="contains no T5X checkpoint"):
    t5x.load_t5x(tmp_path)
