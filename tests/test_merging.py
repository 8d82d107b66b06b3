"""Tests for elm_jax.merging: parameter means, LoRA modes, checks and the CLI."""

import json

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax import cli
from elm_jax.checkpoints import experts
from elm_jax.merging import merge
from elm_jax.models import t5
from elm_jax.training import optimizers

_BASE = "ab" * 32


def _adapter_params(seed):
  rng = np.random.default_rng(seed)
  return {"encoder": {"layers_0": {"mlp_adapter": {
      "down": {"kernel": rng.normal(size=(6, 3)).astype(np.float32)},
      "up": {"kernel": rng.normal(size=(3, 6)).astype(np.float32)}}},
                      "encoder_norm": {"scale": rng.normal(size=(6,)).astype(np.float32)}}}


def _lora_params(seed, shared_a=None):
  rng = np.random.default_rng(seed)
  a = shared_a if shared_a is not None else rng.normal(size=(7, 2)).astype(np.float32)
  return {"decoder": {"layers_0": {"self_attention": {"query": {
      "lora_a": a, "lora_b": rng.normal(size=(2, 5)).astype(np.float32)}}}}}


def _metadata(expert_id, trainable="adapter", base=_BASE, lora=None):
  return experts.ExpertMetadata(id=expert_id, kind="prompt", base_fingerprint=base,
                                trainable=trainable, lora=lora)


def _save(tmp_path, expert_id, params, **kwargs):
  experts.save_expert(tmp_path / expert_id, params=params, metadata=_metadata(expert_id, **kwargs))
  return str(tmp_path / expert_id)


def _flat(tree):
  return traverse_util.flatten_dict(tree)


def test_uniform_mean_equals_numpy_mean():
  trees = [_adapter_params(1), _adapter_params(2)]
  merged = _flat(merge.average_params(trees))
  for key, value in _flat(trees[0]).items():
    expected = np.mean([value, _flat(trees[1])[key]], axis=0)
    np.testing.assert_allclose(merged[key], expected, rtol=1e-6)


def test_weighted_mean_normalizes_weights():
  trees = [_adapter_params(1), _adapter_params(2), _adapter_params(3)]
  merged = _flat(merge.average_params(trees, [1.0, 3.0, 0.0]))
  for key in merged:
    expected = 0.25 * _flat(trees[0])[key] + 0.75 * _flat(trees[1])[key]
    np.testing.assert_allclose(merged[key], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weights,message", [([1.0], "2 experts"), ([1.0, -1.0], ">= 0"),
                                             ([0.0, 0.0], "at least one")])
def test_bad_weights_rejected(weights, message):
  with pytest.raises(merge.MergeError, match=message):
    merge.average_params([_adapter_params(1), _adapter_params(2)], weights)


def test_mismatched_bases_rejected():
  loaded = [(_metadata("a"), _adapter_params(1)), (_metadata("b", base="cd" * 32), _adapter_params(2))]
  with pytest.raises(merge.MergeError) as e:
    merge.merge_experts(loaded, expert_id="m")
  assert _BASE in str(e.value)
  assert "cd" * 32 in str(e.value)


def test_mismatched_trainable_rejected():
  loaded = [(_metadata("a"), _adapter_params(1)), (_metadata("b", trainable="full"), _adapter_params(2))]
  with pytest.raises(merge.MergeError, match="different parameters"):
    merge.merge_experts(loaded, expert_id="m")


def test_mismatched_names_rejected():
  other = _adapter_params(2)
  del other["encoder"]["encoder_norm"]
  with pytest.raises(merge.MergeError, match="encoder_norm"):
    merge.average_params([_adapter_params(1), other], labels=["a", "b"])


def test_mismatched_shapes_rejected():
  other = _adapter_params(2)
  other["encoder"]["encoder_norm"]["scale"] = np.ones((5,), np.float32)
  with pytest.raises(merge.MergeError, match="encoder/encoder_norm/scale"):
    merge.average_params([_adapter_params(1), other])


def test_lora_factors_mode_averages_factors():
  trees = [_lora_params(1), _lora_params(2)]
  merged = _flat(merge.average_params(trees, lora_mode="factors"))
  for key in merged:
    np.testing.assert_allclose(merged[key], (_flat(trees[0])[key] + _flat(trees[1])[key]) / 2,
                               rtol=1e-6)


def _product(tree):
  query = tree["decoder"]["layers_0"]["self_attention"]["query"]
  return np.asarray(query["lora_a"], np.float64) @ np.asarray(query["lora_b"], np.float64)


def test_lora_concat_is_exact_mean_update():
  trees = [_lora_params(1), _lora_params(2), _lora_params(3)]
  weights = [0.2, 0.3, 0.5]
  merged = merge.average_params(trees, weights, lora_mode="concat")
  expected = sum(w * _product(t) for t, w in zip(trees, weights))
  assert merged["decoder"]["layers_0"]["self_attention"]["query"]["lora_a"].shape == (7, 6)
  np.testing.assert_allclose(_product(merged), expected, rtol=1e-5, atol=1e-6)


def test_lora_svd_exact_when_rank_fits():
  shared = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
  trees = [_lora_params(1, shared), _lora_params(2, shared)]
  merged = merge.average_params(trees, lora_mode="svd")
  assert merged["decoder"]["layers_0"]["self_attention"]["query"]["lora_a"].shape == (7, 2)
  expected = (_product(trees[0]) + _product(trees[1])) / 2
  np.testing.assert_allclose(_product(merged), expected, rtol=1e-4, atol=1e-5)


def test_lora_factor_mean_is_not_update_mean():
  trees = [_lora_params(1), _lora_params(2)]
  merged = merge.average_params(trees, lora_mode="factors")
  expected = (_product(trees[0]) + _product(trees[1])) / 2
  assert not np.allclose(_product(merged), expected, atol=1e-3)


def test_merged_metadata_records_sources():
  loaded = [(_metadata("a"), _adapter_params(1)), (_metadata("b"), _adapter_params(2))]
  metadata, _ = merge.merge_experts(loaded, expert_id="a_plus_b", weights=[2, 2])
  assert metadata.kind == "merged"
  assert metadata.sources == ["a", "b"]
  assert metadata.merge["weights"] == [0.5, 0.5]
  assert metadata.base_fingerprint == _BASE


@pytest.fixture(scope="module")
def adapter_base():
  config = t5.T5Config(vocab_size=23, d_model=12, d_kv=3, d_ff=9, num_heads=2,
                       num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0,
                       adapter=t5.AdapterConfig(reduction_factor=4))
  tokens = jnp.array([[5, 3, 1], [7, 1, 0]], jnp.int32)
  params = nn.unbox(jax.jit(t5.T5(config).init)(jax.random.PRNGKey(2), tokens, tokens, tokens))
  return config, params["params"], tokens


def test_merged_expert_loads_and_applies(adapter_base, tmp_path):
  config, base, tokens = adapter_base
  base_fp = experts.fingerprint(base)
  mask = optimizers.trainable_mask(base, "adapter")
  trainable, _ = optimizers.split_trainable(base, mask)
  dirs = []
  for seed in (1, 2):
    rng = np.random.default_rng(seed)
    trained = jax.tree.map(lambda x: np.asarray(x) + rng.normal(size=x.shape).astype(np.float32),
                           trainable)
    experts.save_expert(tmp_path / f"e{seed}", params=trained, metadata=experts.ExpertMetadata(
        id=f"e{seed}", kind="prompt", base_fingerprint=base_fp, trainable="adapter",
        model_config=config.to_dict()))
    dirs.append(str(tmp_path / f"e{seed}"))

  merge.merge_expert_dirs(dirs, str(tmp_path / "merged"))
  metadata, merged = experts.load_expert(tmp_path / "merged", base_params=base)
  assert metadata.id == "merged"
  _, first = experts.load_expert(dirs[0])
  _, second = experts.load_expert(dirs[1])
  for key, value in _flat(merged).items():
    np.testing.assert_allclose(value, (_flat(first)[key] + _flat(second)[key]) / 2, rtol=1e-6)

  applied = experts.apply_expert(base, merged)
  logits = jax.jit(t5.T5(config).apply)({"params": applied}, tokens, tokens, tokens)
  assert np.isfinite(np.asarray(logits)).all()


def test_lora_concat_applies_to_wider_base(tmp_path):
  lora = t5.LoraConfig(rank=2, alpha=4.0, targets=("query",))
  config = t5.T5Config(vocab_size=23, d_model=12, d_kv=3, d_ff=9, num_heads=2,
                       num_encoder_layers=1, num_decoder_layers=1, dropout_rate=0.0, lora=lora)
  tokens = jnp.array([[5, 3, 1], [7, 1, 0]], jnp.int32)
  base = nn.unbox(jax.jit(t5.T5(config).init)(jax.random.PRNGKey(2), tokens, tokens, tokens))["params"]
  trainable, _ = optimizers.split_trainable(base, optimizers.trainable_mask(base, "lora"))
  lora_dict = config.to_dict()["lora"]
  loaded = []
  for seed in (1, 2):
    rng = np.random.default_rng(seed)
    loaded.append((experts.ExpertMetadata(
        id=f"l{seed}", kind="prompt", base_fingerprint=experts.fingerprint(base), trainable="lora",
        model_config=config.to_dict(), lora=lora_dict),
                   jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), trainable)))

  metadata, merged = merge.merge_experts(loaded, expert_id="lm", lora_mode="concat")
  assert metadata.lora["rank"] == 4
  assert metadata.lora["alpha"] == 8.0
  wide_config = t5.T5Config.from_dict(metadata.model_config)
  wide_base = nn.unbox(jax.jit(t5.T5(wide_config).init)(jax.random.PRNGKey(2), tokens, tokens,
                                                        tokens))["params"]
  # LoRA weights are outside the fingerprint, so the wider model has the same base.
  assert experts.fingerprint(wide_base) == metadata.base_fingerprint
  applied = experts.apply_expert(wide_base, merged)
  logits = jax.jit(t5.T5(wide_config).apply)({"params": applied}, tokens, tokens, tokens)
  assert np.isfinite(np.asarray(logits)).all()


def test_cli_merges_weighted(tmp_path, capsys):
  a = _save(tmp_path, "a", _adapter_params(1))
  b = _save(tmp_path, "b", _adapter_params(2))
  status = cli.main(["merge", "--experts", a, b, "--output", str(tmp_path / "m"),
                     "--weights", "1", "3", "--id", "a_b"])
  assert status == 0
  data = json.loads((tmp_path / "m" / "expert.json").read_text())
  assert data["id"] == "a_b"
  assert data["sources"] == ["a", "b"]
  assert data["merge"]["weights"] == [0.25, 0.75]
  assert "a_b" in capsys.readouterr().out


def test_cli_reports_mismatch(tmp_path, capsys):
  a = _save(tmp_path, "a", _adapter_params(1))
  b = _save(tmp_path, "b", _adapter_params(2), base="cd" * 32)
  status = cli.main(["merge", "--experts", a, b, "--output", str(tmp_path / "m")])
  assert status == 1
  assert "different bases" in capsys.readouterr().err
  assert not (tmp_path / "m").exists()
