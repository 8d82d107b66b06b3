"""Checkpoint errors name the parameter and both shapes; failed exports leave nothing."""

import dataclasses
import json
import os

import numpy as np
import pytest
import safetensors.numpy

from elm_jax.checkpoints import hf
from elm_jax.checkpoints import loading
from elm_jax.checkpoints import t5x
from elm_jax.models import t5

CONFIG = t5.T5Config(vocab_size=35, d_model=14, d_kv=4, d_ff=22, num_heads=3,
                     num_encoder_layers=2, num_decoder_layers=3,
                     relative_attention_num_buckets=8, relative_attention_max_distance=24,
                     feed_forward="gated-gelu", tie_word_embeddings=False)
# Another base model: same vocabulary and depth, other widths.
OTHER = dataclasses.replace(CONFIG, d_model=16, d_ff=20)
QUERY = "encoder/layers_1/attention/query/kernel"
HF_QUERY = "encoder.block.1.layer.0.SelfAttention.q.weight"


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  return loading.unflatten_params({
      name: rng.standard_normal(shape).astype(np.float32)
      for name, shape in loading.expected_shapes(config).items()})


@pytest.fixture(scope="module")
def params():
  return random_params(CONFIG)


@pytest.fixture
def hf_dir(tmp_path, params):
  directory = tmp_path / "hf"
  hf.save_hf(directory, CONFIG, params)
  return directory


def rewrite_weights(directory, edit):
  path = directory / hf.SAFETENSORS_NAME
  state = safetensors.numpy.load_file(path)
  edit(state)
  safetensors.numpy.save_file(state, path, metadata={"format": "pt"})


def test_hf_wrong_shape_names_parameter_and_shapes(hf_dir):
  rewrite_weights(hf_dir, lambda s: s.update({HF_QUERY: np.zeros((13, 14), np.float32)}))
  with pytest.raises(loading.CheckpointError) as error:
    hf.load_hf(hf_dir)
  message = str(error.value)
  assert HF_QUERY in message
  assert "(13, 14)" in message
  assert "(12, 14)" in message  # [heads * d_kv, d_model]


def test_hf_missing_key_listed(hf_dir):
  rewrite_weights(hf_dir, lambda s: s.pop(HF_QUERY))
  with pytest.raises(loading.CheckpointError, match="Missing") as error:
    hf.load_hf(hf_dir)
  assert HF_QUERY in str(error.value)


def test_hf_unexpected_key_listed(hf_dir):
  rewrite_weights(hf_dir, lambda s: s.update({"encoder.extra.weight": np.ones(3, np.float32)}))
  with pytest.raises(loading.CheckpointError, match="Unexpected") as error:
    hf.load_hf(hf_dir)
  assert "encoder.extra.weight" in str(error.value)


def test_hf_config_mismatch_names_field(hf_dir):
  with pytest.raises(loading.CheckpointError, match="d_model=14") as error:
    loading.load_model(hf_dir, config=OTHER)
  assert "d_model=16" in str(error.value)


def test_vocab_larger_than_embedding(params):
  with pytest.raises(loading.CheckpointError, match="token_embedder/embedding") as error:
    loading.check_compatible(CONFIG, params, vocab_size=CONFIG.vocab_size + 9)
  message = str(error.value)
  assert f"{(CONFIG.vocab_size, CONFIG.d_model)}" in message
  assert f"{(CONFIG.vocab_size + 9, CONFIG.d_model)}" in message


def test_vocab_far_smaller_than_embedding():
  config = dataclasses.replace(CONFIG, vocab_size=300)
  with pytest.raises(loading.CheckpointError, match="token_embedder/embedding") as error:
    loading.check_compatible(config, random_params(config), vocab_size=100)
  assert "(300, 14)" in str(error.value)


def test_vocab_padding_accepted():
  config = dataclasses.replace(CONFIG, vocab_size=256)
  loading.check_compatible(config, random_params(config), vocab_size=250)


def test_other_base_model_names_parameter_and_shapes(params):
  with pytest.raises(loading.CheckpointError, match="token_embedder/embedding") as error:
    loading.check_compatible(OTHER, params)
  message = str(error.value)
  assert "(35, 14)" in message
  assert "(35, 16)" in message


def test_other_depth_lists_missing_layers(params):
  deeper = dataclasses.replace(CONFIG, num_decoder_layers=4)
  with pytest.raises(loading.CheckpointError, match="decoder/layers_3/") as error:
    loading.check_compatible(deeper, params)
  assert "Missing" in str(error.value)


def test_base_params_fit_adapter_config(params):
  with_adapter = dataclasses.replace(CONFIG, adapter=t5.AdapterConfig(reduction_factor=7))
  loading.check_compatible(with_adapter, params)


def test_t5x_wrong_shape_names_parameter_and_shapes(tmp_path, params):
  t5x.write_t5x_checkpoint(tmp_path, 3, random_params(OTHER))
  with pytest.raises(loading.CheckpointError, match="token_embedder/embedding") as error:
    t5x.load_t5x(tmp_path, config=CONFIG)
  message = str(error.value)
  assert "(35, 16)" in message
  assert "(35, 14)" in message


def test_load_model_unknown_dir_lists_formats(tmp_path):
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(loading.CheckpointError) as error:
    loading.load_model(tmp_path)
  message = str(error.value)
  assert "config.json" in message
  assert "checkpoint_<step>" in message


def test_register_loader_adds_format(tmp_path, params):
  marker = "elm_test_marker.json"
  kind = "test_marker_format"

  def detect(path):
    return os.path.isfile(os.path.join(path, marker))

  def load(path, config):
    return CONFIG, params

  loading.register_loader(kind, detect, load, description="a test marker file")
  try:
    (tmp_path / marker).write_text("{}")
    assert loading.detect_format(str(tmp_path)) == kind
    assert loading.load_model(tmp_path)[0] == CONFIG
    with pytest.raises(ValueError, match="already registered"):
      loading.register_loader(kind, detect, load)
  finally:
    loading._LOADERS[:] = [l for l in loading._LOADERS if l.kind != kind]  # pylint: disable=protected-access


def test_export_missing_key_writes_nothing(tmp_path, params):
  broken = loading.flatten_params(params)
  broken.pop(QUERY)
  out = tmp_path / "out"
  with pytest.raises(loading.CheckpointError, match=QUERY):
    hf.save_hf(out, CONFIG, loading.unflatten_params(broken))
  assert os.listdir(tmp_path) == []


def test_export_wrong_shape_names_parameter_and_shapes(tmp_path, params):
  broken = loading.flatten_params(params)
  broken[QUERY] = np.zeros((14, 13), np.float32)
  with pytest.raises(loading.CheckpointError, match=QUERY) as error:
    hf.save_hf(tmp_path / "out", CONFIG, loading.unflatten_params(broken))
  assert "(14, 13)" in str(error.value)
  assert "(14, 12)" in str(error.value)


def test_export_failure_mid_write_keeps_old_dir(tmp_path, params, monkeypatch):
  out = tmp_path / "out"
  hf.save_hf(out, CONFIG, params)
  before = sorted(os.listdir(out))
  config_before = (out / "config.json").read_text()

  def failing_save(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
  with pytest.raises(OSError, match="disk full"):
    hf.save_hf(out, dataclasses.replace(CONFIG, dropout_rate=0.0), params, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"]
  assert sorted(os.listdir(out)) == before
  assert (out / "config.json").read_text() == config_before


def test_export_refuses_existing_dir(tmp_path, params):
  (tmp_path / "out").mkdir()
  with pytest.raises(FileExistsError, match="overwrite=True"):
    hf.save_hf(tmp_path / "out", CONFIG, params)


def test_export_rejects_adapter_params(tmp_path):
  with_adapter = dataclasses.replace(CONFIG, adapter=t5.AdapterConfig(reduction_factor=7))
  with pytest.raises(loading.CheckpointError, match="attention_adapter"):
    hf.save_hf(tmp_path / "out", with_adapter, random_params(with_adapter))
  assert os.listdir(tmp_path) == []


def test_sharded_index_missing_shard_named(tmp_path, params):
  out = tmp_path / "out"
  hf.save_hf(out, CONFIG, params, max_shard_bytes=4_000)
  index = json.loads((out / hf.SAFETENSORS_INDEX_NAME).read_text())
  shard = sorted(set(index["weight_map"].values()))[1]
  os.remove(out / shard)
  with pytest.raises(loading.CheckpointError, match=shard):
    hf.load_hf(out)
