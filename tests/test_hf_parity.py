"""Hugging Face T5 import and export against transformers 4.57 (PyTorch, float32)."""

import json
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from elm_jax.checkpoints import hf
from elm_jax.checkpoints import loading
from elm_jax.models import t5

transformers.logging.set_verbosity_error()

# Tiny configs with odd sizes: heads * d_kv != d_model, non-default buckets and
# max distance, encoder and decoder of different depth.
HF_CONFIGS = {
    "v1_0": dict(vocab_size=37, d_model=20, d_kv=7, d_ff=26, num_heads=3, num_layers=2,
                 num_decoder_layers=3, relative_attention_num_buckets=10,
                 relative_attention_max_distance=20, feed_forward_proj="relu",
                 tie_word_embeddings=True),
    "v1_1": dict(vocab_size=41, d_model=24, d_kv=5, d_ff=30, num_heads=4, num_layers=3,
                 num_decoder_layers=2, relative_attention_num_buckets=12,
                 relative_attention_max_distance=40, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False),
}
TOLERANCE = 1e-4

# Encoder and decoder padding in different rows; decoder inputs start with 0.
ENCODER_TOKENS = np.array([[5, 6, 7, 8, 9, 3, 2, 1, 0, 0],
                           [4, 11, 4, 1, 0, 0, 0, 0, 0, 0],
                           [9, 8, 7, 6, 5, 4, 3, 2, 12, 1]])
TARGET_TOKENS = np.array([[3, 4, 5, 6, 1, 0, 0],
                          [7, 8, 9, 10, 11, 12, 1],
                          [13, 1, 0, 0, 0, 0, 0]])
DECODER_TOKENS = np.concatenate([np.zeros((3, 1), np.int64), TARGET_TOKENS[:, :-1]], axis=1)


def make_hf_model(kind: str, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """A random tiny HF model; weights get std 0.3 so the logits are far from uniform."""
  torch.manual_seed(seed)
  config = transformers.T5Config(decoder_start_token_id=0, **HF_CONFIGS[kind])
  model = transformers.T5ForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" not in name:
        param.normal_(0.0, 0.3)
  return model


def hf_logits(model, enc=ENCODER_TOKENS, dec=DECODER_TOKENS, tgt=TARGET_TOKENS) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(enc), attention_mask=torch.tensor(enc > 0),
                 decoder_input_ids=torch.tensor(dec),
                 decoder_attention_mask=torch.tensor(tgt > 0)).logits.numpy()


def jax_logits(config, params, enc=ENCODER_TOKENS, dec=DECODER_TOKENS, tgt=TARGET_TOKENS):
  apply = jax.jit(t5.T5(config).apply)  # One compilation beats op-by-op dispatch here.
  return np.asarray(apply({"params": params}, enc, dec, tgt))


def max_error_at_real_positions(a, b, tgt=TARGET_TOKENS) -> float:
  return float(np.abs(a - b)[tgt > 0].max())


def assert_trees_equal(a, b):
  flat_a, flat_b = loading.flatten_params(a), loading.flatten_params(b)
  assert sorted(flat_a) == sorted(flat_b)
  for name in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_a[name]), np.asarray(flat_b[name]),
                                  err_msg=name)


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def saved(request, tmp_path_factory):
  """(kind, HF model, its save_pretrained directory with model.safetensors)."""
  model = make_hf_model(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(directory, safe_serialization=True)
  return request.param, model, str(directory)


def test_import_config_fields(saved):
  kind, _, directory = saved
  config, _ = hf.load_hf(directory)
  expected = HF_CONFIGS[kind]
  assert config.vocab_size == expected["vocab_size"]
  assert (config.d_model, config.d_kv, config.d_ff, config.num_heads) == (
      expected["d_model"], expected["d_kv"], expected["d_ff"], expected["num_heads"])
  assert config.num_encoder_layers == expected["num_layers"]
  assert config.num_decoder_layers == expected["num_decoder_layers"]
  assert config.relative_attention_num_buckets == expected["relative_attention_num_buckets"]
  assert config.relative_attention_max_distance == expected["relative_attention_max_distance"]
  assert config.feed_forward == expected["feed_forward_proj"]
  assert config.tie_word_embeddings == expected["tie_word_embeddings"]


def test_import_logits_match(saved):
  _, model, directory = saved
  config, params = hf.load_hf(directory)
  error = max_error_at_real_positions(jax_logits(config, params), hf_logits(model))
  assert error < TOLERANCE


def test_import_scanned_logits_match(saved):
  _, model, directory = saved
  unscanned, _ = hf.load_hf(directory)
  config, params = hf.load_hf(directory, config=t5.T5Config(
      **{**unscanned.__dict__, "scan_layers": True}))
  assert "layers" in params["encoder"]
  error = max_error_at_real_positions(jax_logits(config, params), hf_logits(model))
  assert error < TOLERANCE


def test_export_loads_in_transformers(saved, tmp_path):
  _, model, directory = saved
  config, params = hf.load_hf(directory)
  out = tmp_path / "exported"
  hf.save_hf(out, config, params)
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  error = max_error_at_real_positions(hf_logits(reloaded), hf_logits(model))
  assert error < TOLERANCE
  for name, value in model.state_dict().items():
    np.testing.assert_array_equal(reloaded.state_dict()[name].numpy(), value.numpy(),
                                  err_msg=name)


def test_export_config_keys(saved, tmp_path):
  _, _, directory = saved
  config, params = hf.load_hf(directory)
  hf.save_hf(tmp_path / "exported", config, params)
  written = json.loads((tmp_path / "exported" / "config.json").read_text())
  assert written["architectures"] == ["T5ForConditionalGeneration"]
  assert written["tie_word_embeddings"] == config.tie_word_embeddings
  assert hf.config_from_hf(written) == config


def test_export_scanned_equals_unscanned(saved, tmp_path):
  _, _, directory = saved
  config, params = hf.load_hf(directory)
  scanned_config = t5.T5Config(**{**config.__dict__, "scan_layers": True})
  hf.save_hf(tmp_path / "a", config, params)
  hf.save_hf(tmp_path / "b", scanned_config, t5.stack_layers(params))
  a = safetensors.numpy.load_file(tmp_path / "a" / hf.SAFETENSORS_NAME)
  b = safetensors.numpy.load_file(tmp_path / "b" / hf.SAFETENSORS_NAME)
  assert_trees_equal(a, b)


def test_sharded_safetensors_import(saved, tmp_path):
  _, model, directory = saved
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / hf.SAFETENSORS_INDEX_NAME).is_file()
  assert not (tmp_path / hf.SAFETENSORS_NAME).exists()
  _, sharded = hf.load_hf(tmp_path)
  _, single = hf.load_hf(directory)
  assert_trees_equal(sharded, single)


def test_sharded_export_loads_in_transformers(saved, tmp_path):
  _, model, directory = saved
  config, params = hf.load_hf(directory)
  out = tmp_path / "sharded"
  hf.save_hf(out, config, params, max_shard_bytes=8_000)
  index = json.loads((out / hf.SAFETENSORS_INDEX_NAME).read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2
  assert sorted(p.name for p in out.glob("model-*.safetensors")) == shards
  reloaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
  assert max_error_at_real_positions(hf_logits(reloaded), hf_logits(model)) < TOLERANCE
  _, params_again = hf.load_hf(out)
  assert_trees_equal(params_again, params)


def test_pytorch_bin_loads_with_weights_only(saved, tmp_path, monkeypatch):
  _, model, directory = saved
  model.save_pretrained(tmp_path, safe_serialization=False)
  assert (tmp_path / hf.TORCH_NAME).is_file()
  calls = []
  real_load = torch.load

  def recording_load(*args, **kwargs):
    calls.append(kwargs)
    return real_load(*args, **kwargs)

  monkeypatch.setattr(torch, "load", recording_load)
  _, from_bin = hf.load_hf(tmp_path)
  assert [c.get("weights_only") for c in calls] == [True]
  _, from_safetensors = hf.load_hf(directory)
  assert_trees_equal(from_bin, from_safetensors)


def test_pytorch_bin_without_torch_says_install(saved, tmp_path, monkeypatch):
  _, model, _ = saved
  model.save_pretrained(tmp_path, safe_serialization=False)
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
  with pytest.raises(loading.CheckpointError, match="pip install torch") as error:
    hf.load_hf(tmp_path)
  assert "safetensors" in str(error.value)


def test_load_model_detects_hf_dir(saved):
  _, _, directory = saved
  config, params = loading.load_model(directory)
  expected_config, expected_params = hf.load_hf(directory)
  assert config == expected_config
  assert_trees_equal(params, expected_params)


def test_config_defaults_follow_transformers():
  config = hf.config_from_hf({"model_type": "t5", "vocab_size": 50, "d_model": 8,
                              "d_kv": 3, "d_ff": 10, "num_heads": 2, "num_layers": 3})
  reference = transformers.T5Config(vocab_size=50, d_model=8, d_kv=3, d_ff=10,
                                    num_heads=2, num_layers=3)
  assert config.num_decoder_layers == reference.num_decoder_layers
  assert config.tie_word_embeddings == reference.tie_word_embeddings
  assert config.feed_forward == reference.feed_forward_proj
  assert config.relative_attention_max_distance == reference.relative_attention_max_distance


def test_unsupported_feed_forward_rejected(tmp_path):
  with pytest.raises(loading.CheckpointError, match="gated-silu"):
    hf.config_from_hf({"feed_forward_proj": "gated-silu"})


def test_embedding_aliases_accepted(saved):
  _, model, directory = saved
  # The in-memory state dict contains every alias (and lm_head when tied).
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "encoder.embed_tokens.weight" in state
  config, from_file = hf.load_hf(directory)
  assert_trees_equal(hf.params_from_hf_state(state, config), from_file)
