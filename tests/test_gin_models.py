"""Every shipped model gin file parses and builds a T5."""

import glob
import os

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax.models import t5

GIN_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "gin", "models")
MODEL_FILES = sorted(os.path.relpath(p, GIN_DIR)
                     for p in glob.glob(os.path.join(GIN_DIR, "**", "*.gin"), recursive=True))
RUN_FOR_REAL = ("t5_1_1/tiny.gin", "t5_1_1/small.gin")


@gin.configurable("elm_test_model_holder")
def _model_holder(model_config=gin.REQUIRED):
  return model_config


def _load(relative_path: str) -> t5.T5Config:
  """Parses one model file and evaluates its MODEL_CONFIG macro."""
  gin.clear_config()
  gin.parse_config_file(os.path.join(GIN_DIR, relative_path))
  gin.parse_config("elm_test_model_holder.model_config = %MODEL_CONFIG")
  config = _model_holder()
  gin.clear_config()
  return config


def test_all_expected_model_files_are_shipped():
  sizes = ("small", "base", "large", "xl", "xxl")
  expected = {f"t5_1_1/{s}.gin" for s in sizes + ("tiny",)}
  expected |= {f"t5_1_1_lm_adapted/{s}.gin" for s in sizes}
  expected |= {"t5_1_0/small.gin", "t5_1_0/base.gin"}
  assert set(MODEL_FILES) == expected


@pytest.mark.parametrize("path", [p for p in MODEL_FILES if p not in RUN_FOR_REAL])
def test_model_file_builds_abstractly(path):
  config = _load(path)
  assert isinstance(config, t5.T5Config)
  abstract = t5.abstract_variables(config, encoder_length=4, decoder_length=3)["params"]
  assert t5.count_params(nn.meta.unbox(abstract)) == config.num_params_estimate()


@pytest.mark.parametrize("path", RUN_FOR_REAL)
def test_model_file_initializes_and_runs(path):
  config = _load(path)
  params = t5.init_params(config, jax.random.key(0), encoder_length=5, decoder_length=3)
  enc = jnp.array([[7, 8, 9, 1, 0]], jnp.int32)
  dec = jnp.array([[0, 11, 12]], jnp.int32)
  logits = t5.T5(config).apply({"params": params}, enc, dec)
  assert logits.shape == (1, 3, config.vocab_size)
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("size,params_in_millions", [
    ("small", 77.0), ("base", 247.6), ("large", 783.2), ("xl", 2849.8), ("xxl", 11135.3)])
def test_v11_sizes_match_the_published_models(size, params_in_millions):
  config = _load(f"t5_1_1/{size}.gin")
  assert _load(f"t5_1_1_lm_adapted/{size}.gin") == config
  assert config.feed_forward == "gated-gelu"
  assert not config.tie_word_embeddings
  np.testing.assert_allclose(config.num_params_estimate() / 1e6, params_in_millions,
                             atol=0.1)


def test_v10_files_are_relu_and_tied():
  for size, params_in_millions in (("small", 60.5), ("base", 222.9)):
    config = _load(f"t5_1_0/{size}.gin")
    assert (config.feed_forward, config.tie_word_embeddings) == ("relu", True)
    np.testing.assert_allclose(config.num_params_estimate() / 1e6, params_in_millions,
                               atol=0.1)


def test_misspelled_binding_is_rejected():
  gin.clear_config()
  text = open(os.path.join(GIN_DIR, "t5_1_1", "tiny.gin")).read()
  text = text.replace("d_model = 40", "d_modle = 40")
  assert "d_modle" in text
  with pytest.raises(ValueError, match="d_modle"):
    gin.parse_config(text)
  gin.clear_config()
