"""Sharded T5 on the forced 8-device CPU mesh equals one device."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elm_jax import partitioning
from elm_jax.models import t5

# Sizes divisible by every mesh axis used below (vocab, mlp, heads * d_kv and
# heads by 4; batch by 4), so the sharded dimensions are really split.
SHARDABLE = t5.T5Config(
    vocab_size=104, d_model=40, d_kv=6, d_ff=52, num_heads=4,
    num_encoder_layers=2, num_decoder_layers=3,
    relative_attention_num_buckets=7, relative_attention_max_distance=19,
    dropout_rate=0.0)
# The model tests' odd sizes (vocab 101, heads * d_kv 18) do not divide by 4.
ODD = dataclasses.replace(SHARDABLE, vocab_size=101, num_heads=3)


def _batch(rng, batch=4, enc_len=9, dec_len=7):
  enc = rng.integers(2, 100, (batch, enc_len)).astype(np.int32)
  enc[1, -3:] = 0
  targets = rng.integers(2, 100, (batch, dec_len)).astype(np.int32)
  targets[2, -2:] = 0
  dec = np.concatenate([np.zeros_like(targets[:, :1]), targets[:, :-1]], 1)
  return enc, dec, targets


def _sharded_logits(config, params, batch, mesh):
  abstract = t5.abstract_variables(config)["params"]
  param_shardings = partitioning.params_shardings(abstract, mesh)
  data = partitioning.data_sharding(mesh)
  model = t5.T5(config)

  def forward(p, enc, dec, targets):
    return model.apply({"params": p}, enc, dec, targets)

  with partitioning.activate(mesh):
    run = jax.jit(forward, in_shardings=(param_shardings, data, data, data),
                  out_shardings=data)
    params = jax.device_put(params, param_shardings)
    batch = jax.device_put(batch, data)
    logits = run(params, *batch)
  return logits, param_shardings


@pytest.mark.parametrize("config,data,model", [
    (SHARDABLE, 2, 4),
    (dataclasses.replace(SHARDABLE, scan_layers=True), 4, 2),
    (ODD, 2, 4),
], ids=["2x4", "4x2-scanned", "2x4-odd-sizes"])
def test_sharded_forward_equals_single_device(config, data, model):
  params = t5.init_params(dataclasses.replace(config, scan_layers=False), jax.random.key(0))
  if config.scan_layers:
    params = t5.stack_layers(params)
  batch = _batch(np.random.default_rng(0))
  expected = np.asarray(t5.T5(config).apply({"params": params}, *batch))
  mesh = partitioning.make_mesh(data, model)
  logits, shardings = _sharded_logits(config, params, batch, mesh)
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)

  embedding = shardings["token_embedder"]["embedding"].spec
  divisible = config.vocab_size % model == 0
  assert embedding == (jax.sharding.PartitionSpec("model", None) if divisible
                       else jax.sharding.PartitionSpec(None, None))
  assert len(logits.sharding.device_set) == data * model


def test_scanned_params_get_a_replicated_layers_axis():
  config = dataclasses.replace(SHARDABLE, scan_layers=True)
  shardings = partitioning.params_shardings(
      t5.abstract_variables(config)["params"], partitioning.make_mesh(2, 4))
  spec = shardings["decoder"]["layers"]["mlp"]["wi_0"]["kernel"].spec
  assert spec == jax.sharding.PartitionSpec(None, None, "model")


@pytest.mark.parametrize("config", [
    SHARDABLE,
    dataclasses.replace(SHARDABLE, scan_layers=True, adapter=t5.AdapterConfig(8),
                        lora=t5.LoraConfig(rank=2, targets=("query", "wo"))),
], ids=["plain", "scanned-adapter-lora"])
def test_every_parameter_has_logical_axis_names(config):
  abstract = t5.abstract_variables(config)["params"]
  specs = partitioning.logical_axes_of(abstract)
  leaves = jax.tree_util.tree_leaves(nn.meta.unbox(abstract))
  spec_leaves = jax.tree_util.tree_leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert len(spec_leaves) == len(leaves)
  for spec, leaf in zip(spec_leaves, leaves):
    assert len(spec) == leaf.ndim
    assert all(name in partitioning.LOGICAL_AXES for name in spec), spec


def test_make_mesh_rejects_wrong_device_count():
  with pytest.raises(ValueError, match=r"data=3 x model=2 needs 6 devices, but 8"):
    partitioning.make_mesh(3, 2)
  mesh = partitioning.make_mesh(1, 8)
  assert dict(mesh.shape) == {"data": 1, "model": 8}


def test_rules_with_an_unknown_mesh_axis_are_rejected():
  mesh = partitioning.make_mesh(2, 4)
  with pytest.raises(ValueError, match="'tensor'"):
    partitioning.logical_to_sharding(jax.sharding.PartitionSpec("vocab"), mesh,
                                     (("vocab", "tensor"),))


def test_activation_constraints_follow_the_rules():
  mesh = partitioning.make_mesh(2, 4)

  def constrained(x):
    return nn.with_logical_constraint(x, ("batch", "length", "vocab"))

  with partitioning.activate(mesh):
    hlo = jax.jit(constrained).lower(jnp.zeros((4, 3, 8))).as_text()
  assert "sharding" in hlo
  plain = jax.jit(constrained).lower(jnp.zeros((4, 3, 8))).as_text()
  assert "sharding" not in plain
