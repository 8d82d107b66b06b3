"""Tests for elm_jax.training.optimizers: schedules, masks, frozen updates, accumulation."""

import math

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from elm_jax.models import t5
from elm_jax.training import optimizers


def _tiny_config(**kwargs):
  return t5.T5Config(vocab_size=37, d_model=24, d_kv=5, d_ff=19, num_heads=3,
                     num_encoder_layers=2, num_decoder_layers=1, dropout_rate=0.0, **kwargs)


def _init(config, boxed=False):
  tokens = jnp.array([[3, 7, 5, 1, 0], [4, 2, 9, 6, 1]], jnp.int32)
  variables = jax.jit(t5.T5(config).init)(jax.random.PRNGKey(0), tokens, tokens, tokens)
  if boxed:
    return variables["params"], tokens
  return nn.unbox(variables)["params"], tokens


@pytest.fixture(scope="module")
def adapter_model():
  config = _tiny_config(adapter=t5.AdapterConfig(reduction_factor=8),
                        lora=t5.LoraConfig(rank=2, targets=("query", "wi_0")))
  boxed, tokens = _init(config, boxed=True)
  return config, nn.unbox(boxed), tokens, boxed


def _trained_names(mask):
  return sorted("/".join(k) for k, v in traverse_util.flatten_dict(mask).items() if v)


def _loss_fn(config, tokens):

  def loss(params):
    logits = t5.T5(config).apply({"params": params}, tokens, tokens, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()

  return loss


# Schedules.


def test_linear_decay_values():
  peak, total, warmup = 3e-4, 50, 10
  schedule = optimizers.linear_decay(peak, total, warmup_steps=warmup)
  for step in (0, 4, 10, 23, 50, 70):
    if step < warmup:
      expected = peak * step / warmup
    else:
      expected = peak * max(0.0, 1 - (step - warmup) / (total - warmup))
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12), step


def test_linear_decay_without_warmup_starts_at_peak():
  schedule = optimizers.linear_decay(1e-4, 40)
  assert float(schedule(0)) == pytest.approx(1e-4)
  assert float(schedule(30)) == pytest.approx(1e-4 * 10 / 40)


def test_warmup_then_rsqrt_values():
  peak, warmup = 0.01, 100
  schedule = optimizers.warmup_then_rsqrt(peak, warmup)
  with_warmup = optimizers.warmup_then_rsqrt(peak, warmup, linear_warmup=True)
  for step in (0, 50, 100, 400, 10_000):
    assert float(schedule(step)) == pytest.approx(
        peak * math.sqrt(warmup / max(step, warmup)), rel=1e-6), step
    assert float(with_warmup(step)) == pytest.approx(
        peak * min(1, step / warmup) * math.sqrt(warmup / max(step, warmup)), rel=1e-6), step


def test_rsqrt_matches_t5_form():
  schedule = optimizers.warmup_then_rsqrt(0.01, 10_000)
  for step in (5, 10_000, 40_000):
    assert float(schedule(step)) == pytest.approx(1 / math.sqrt(max(step, 10_000)), rel=1e-6)


def test_constant_schedule():
  assert float(optimizers.constant(1e-3)(123)) == pytest.approx(1e-3)


def test_linear_decay_rejects_bad_steps():
  with pytest.raises(ValueError, match="total_steps > warmup_steps"):
    optimizers.linear_decay(1e-4, 10, warmup_steps=10)


# Masks on the real model tree.


def test_adapter_mask_selects_adapters_and_norms(adapter_model):
  _, params, _, _ = adapter_model
  names = _trained_names(optimizers.trainable_mask(params, "adapter"))
  assert names
  for name in names:
    parts = name.split("/")
    assert optimizers.is_adapter(tuple(parts)) or optimizers.is_layer_norm(tuple(parts)), name
  flat = traverse_util.flatten_dict(params)
  expected_adapters = [k for k in flat if any(p.endswith("_adapter") for p in k)]
  expected_norms = [k for k in flat if k[-1] == "scale"]
  assert len(names) == len(expected_adapters) + len(expected_norms)
  # 2 encoder layers x 2 adapters + 1 decoder layer x 2 adapters, 2 kernels each.
  assert len(expected_adapters) == 12


def test_adapter_mask_freezes_base_weights(adapter_model):
  _, params, _, _ = adapter_model
  names = _trained_names(optimizers.trainable_mask(params, "adapter"))
  for frozen in ("token_embedder/embedding", "decoder/logits_dense/kernel",
                 "encoder/relpos_bias/rel_embedding", "encoder/layers_0/attention/query/kernel",
                 "encoder/layers_0/attention/query/lora_a", "decoder/layers_0/mlp/wo/kernel"):
    assert frozen not in names, frozen


def test_adapter_mask_without_norms(adapter_model):
  _, params, _, _ = adapter_model
  names = _trained_names(optimizers.trainable_mask(params, "adapter", train_layer_norms=False))
  assert all("_adapter/" in name for name in names)


def test_lora_mask(adapter_model):
  _, params, _, _ = adapter_model
  names = _trained_names(optimizers.trainable_mask(params, "lora"))
  assert names
  assert all(name.endswith(("lora_a", "lora_b")) for name in names)
  with_norms = _trained_names(optimizers.trainable_mask(params, "lora", train_layer_norms=True))
  assert "encoder/encoder_norm/scale" in with_norms


def test_mask_requires_adapter_weights():
  tokens = jnp.ones((2, 5), jnp.int32)
  params = jax.eval_shape(t5.T5(_tiny_config()).init, jax.random.PRNGKey(0), tokens, tokens,
                          tokens)
  params = nn.unbox(params)["params"]
  with pytest.raises(ValueError, match="AdapterConfig"):
    optimizers.trainable_mask(params, "adapter")


def test_mask_rejects_unknown_mode(adapter_model):
  with pytest.raises(ValueError, match="Unknown trainable mode 'adaptor'"):
    optimizers.trainable_mask(adapter_model[1], "adaptor")


def test_mask_on_boxed_params(adapter_model):
  _, params, _, boxed = adapter_model
  unboxed_mask = nn.unbox(optimizers.trainable_mask(boxed, "adapter"))
  assert unboxed_mask == optimizers.trainable_mask(params, "adapter")


# Updates.


def test_frozen_params_unchanged_after_updates(adapter_model):
  config, params, tokens, _ = adapter_model
  mask = optimizers.trainable_mask(params, "adapter")
  tx = optimizers.make_optimizer(optimizers.adamw(1e-2), mask=mask, clip_norm=1.0)
  state = tx.init(params)
  grad_fn = jax.jit(jax.grad(_loss_fn(config, tokens)))
  new = params
  for _ in range(3):
    updates, state = tx.update(grad_fn(new), state, new)
    new = optax.apply_updates(new, updates)

  flat_old, flat_new = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
  flat_mask = traverse_util.flatten_dict(mask)
  for key, trainable in flat_mask.items():
    same = np.array_equal(np.asarray(flat_old[key]), np.asarray(flat_new[key]))
    if trainable:
      assert not same, key
    else:
      assert same, key


def test_state_only_for_trainable(adapter_model):
  _, params, _, _ = adapter_model
  mask = optimizers.trainable_mask(params, "adapter")
  state = optimizers.make_optimizer(optimizers.adamw(1e-3), mask=mask).init(params)
  sizes = [x.size for x in jax.tree.leaves(state) if x.ndim > 0]
  # AdamW keeps mu and nu per trainable scalar; everything else is a scalar count.
  assert sum(sizes) == 2 * optimizers.count_parameters(params, mask)


def test_split_and_merge_round_trip(adapter_model):
  _, params, _, _ = adapter_model
  mask = optimizers.trainable_mask(params, "lora")
  trainable, frozen = optimizers.split_trainable(params, mask)
  assert optimizers.count_parameters(trainable) == optimizers.count_parameters(params, mask)
  merged = optimizers.merge_params(trainable, frozen)
  assert jax.tree.all(jax.tree.map(np.array_equal, merged, params))


def test_split_training_matches_masked_training(adapter_model):
  config, params, tokens, _ = adapter_model
  mask = optimizers.trainable_mask(params, "adapter")
  loss = _loss_fn(config, tokens)

  masked_tx = optimizers.make_optimizer(optimizers.adamw(1e-2), mask=mask)
  masked_state = masked_tx.init(params)
  updates, _ = masked_tx.update(jax.jit(jax.grad(loss))(params), masked_state, params)
  masked_result = optax.apply_updates(params, updates)

  trainable, frozen = optimizers.split_trainable(params, mask)
  split_tx = optimizers.make_optimizer(optimizers.adamw(1e-2))
  grads = jax.jit(jax.grad(lambda tr: loss(optimizers.merge_params(tr, frozen))))(trainable)
  updates, _ = split_tx.update(grads, split_tx.init(trainable), trainable)
  split_result = optimizers.merge_params(optax.apply_updates(trainable, updates), frozen)

  for a, b in zip(jax.tree.leaves(masked_result), jax.tree.leaves(split_result)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _regression_problem():
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)}
  x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)

  def loss(p, xb, yb):
    return jnp.mean((xb @ p["w"] + p["b"] - yb) ** 2)

  return params, x, y, loss


@pytest.mark.parametrize("make_base", [lambda: optimizers.adamw(0.05, weight_decay=0.01),
                                       lambda: optimizers.adafactor(0.05)])
def test_accumulation_equals_big_batch(make_base):
  params, x, y, loss = _regression_problem()
  k = 3

  big_tx = optimizers.make_optimizer(make_base(), clip_norm=0.5)
  updates, _ = big_tx.update(jax.grad(loss)(params, x, y), big_tx.init(params), params)
  big = optax.apply_updates(params, updates)

  acc_tx = optimizers.make_optimizer(make_base(), clip_norm=0.5, accumulation_steps=k)
  state = acc_tx.init(params)
  acc = params
  for i, (xb, yb) in enumerate(zip(jnp.split(x, k), jnp.split(y, k))):
    updates, state = acc_tx.update(jax.grad(loss)(acc, xb, yb), state, acc)
    acc = optax.apply_updates(acc, updates)
    if i < k - 1:
      assert jax.tree.all(jax.tree.map(np.array_equal, acc, params)), i

  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(big)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_adafactor_factors_large_matrices():
  params = {"big": jnp.ones((130, 129)), "small": jnp.ones((7, 130))}
  state = optimizers.adafactor(1e-3).init(params)
  sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  # Factored: row and column vectors for "big"; "small" (7 < 128) keeps a full
  # second moment. Unused slots are stored as single-element placeholders.
  assert 130 * 129 not in sizes
  assert 7 * 130 in sizes
  assert 130 in sizes and 129 in sizes


def test_optimizer_config_builds(adapter_model):
  _, params, _, _ = adapter_model
  config = optimizers.OptimizerConfig(optimizers.adafactor(optimizers.constant(1e-4)),
                                      mode="adapter", clip_norm=1.0)
  mask = config.mask(params)
  tx = config.build(mask=mask)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  flat_updates = traverse_util.flatten_dict(updates)
  assert not np.any(flat_updates[("token_embedder", "embedding")])
  assert np.any(flat_updates[("encoder", "layers_0", "mlp_adapter", "down", "kernel")])
