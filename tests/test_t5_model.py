"""Tests of the T5 model: masks, packing, caching, layouts, precision, adapters, LoRA."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.t5 import modeling_t5

from elm_jax.models import layers
from elm_jax.models import t5

# Odd sizes: heads * d_kv (18) differs from d_model (40), encoder and decoder
# depths differ, and the bucket count is odd.
TINY = t5.T5Config(
    vocab_size=101, d_model=40, d_kv=6, d_ff=52, num_heads=3,
    num_encoder_layers=2, num_decoder_layers=3,
    relative_attention_num_buckets=7, relative_attention_max_distance=19,
    dropout_rate=0.1)
TINY_V10 = dataclasses.replace(TINY, feed_forward="relu", tie_word_embeddings=True)
EOS = 1


@functools.lru_cache(maxsize=None)
def _params(config: t5.T5Config, seed: int = 0):
  # Eager init: its op-by-op compilations are shared between configs, which
  # keeps this file fast on two cores (`init_params` jits a whole new graph).
  variables = t5.init_variables(config, jax.random.key(seed))
  return nn.meta.unbox(variables["params"])


@functools.lru_cache(maxsize=None)
def _forward(config: t5.T5Config):
  """Jitted teacher-forced forward pass taking params and a dict of features."""
  model = t5.T5(config)

  @jax.jit
  def run(params, features):
    features = dict(features)
    enc = features.pop("encoder_input_tokens")
    dec = features.pop("decoder_input_tokens")
    return model.apply({"params": params}, enc, dec, **features)
  return run


def _logits(config, params, **features):
  features = {k: jnp.asarray(v) for k, v in features.items()}
  return np.asarray(_forward(config)(params, features))


def _random_tokens(rng, shape):
  return rng.integers(2, TINY.vocab_size, shape).astype(np.int32)


def _shift_right(targets):
  return np.concatenate([np.zeros_like(targets[..., :1]), targets[..., :-1]], -1)


def _example(rng, enc_len, dec_len):
  inputs = np.append(_random_tokens(rng, (enc_len - 1,)), EOS).astype(np.int32)
  targets = np.append(_random_tokens(rng, (dec_len - 1,)), EOS).astype(np.int32)
  return inputs, targets


def _pad(x, length):
  return np.pad(x, (0, length - len(x)))


def _cross_entropy_loss(config, params, batch, **kw):
  logits = t5.T5(config).apply({"params": params}, batch["inputs"], batch["dec_in"],
                               batch["targets"], **kw)
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  return jnp.sum(nll * (batch["targets"] > 0))


def _batch(seed=0, batch=2, enc_len=9, dec_len=7):
  rng = np.random.default_rng(seed)
  inputs = _random_tokens(rng, (batch, enc_len))
  inputs[1, enc_len - 3:] = 0
  targets = _random_tokens(rng, (batch, dec_len))
  targets[1, dec_len - 2:] = 0
  return {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
          "dec_in": jnp.asarray(_shift_right(targets))}


# Parameters.


def test_parameter_tree_follows_the_contract():
  params = _params(TINY)
  enc0 = params["encoder"]["layers_0"]
  dec2 = params["decoder"]["layers_2"]
  assert params["token_embedder"]["embedding"].shape == (101, 40)
  assert params["encoder"]["relpos_bias"]["rel_embedding"].shape == (3, 7)
  assert params["decoder"]["relpos_bias"]["rel_embedding"].shape == (3, 7)
  assert enc0["attention"]["query"]["kernel"].shape == (40, 18)
  assert enc0["attention"]["out"]["kernel"].shape == (18, 40)
  assert enc0["mlp"]["wi_0"]["kernel"].shape == (40, 52)
  assert enc0["mlp"]["wo"]["kernel"].shape == (52, 40)
  assert set(dec2) == {"pre_self_attention_layer_norm", "self_attention",
                       "pre_cross_attention_layer_norm", "encoder_decoder_attention",
                       "pre_mlp_layer_norm", "mlp"}
  assert params["decoder"]["logits_dense"]["kernel"].shape == (40, 101)
  assert sorted(k for k in params["encoder"] if k.startswith("layers_")) == [
      "layers_0", "layers_1"]
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_v10_parameters_are_relu_and_tied():
  params = _params(TINY_V10)
  assert set(params["encoder"]["layers_0"]["mlp"]) == {"wi", "wo"}
  assert "logits_dense" not in params["decoder"]


@pytest.mark.parametrize("config", [
    TINY, TINY_V10,
    dataclasses.replace(TINY, adapter=t5.AdapterConfig(reduction_factor=8)),
    dataclasses.replace(TINY, lora=t5.LoraConfig(rank=3, targets=layers.LORA_TARGETS)),
], ids=["v11", "v10", "adapter", "lora"])
def test_num_params_estimate_counts_the_initialized_tree(config):
  abstract = t5.abstract_variables(config)["params"]
  assert config.num_params_estimate() == t5.count_params(nn.meta.unbox(abstract))


def test_initialization_scales_like_t5x():
  config = dataclasses.replace(TINY, d_model=64, d_kv=16, num_heads=8, d_ff=96)
  params = _params(config)
  attention = params["encoder"]["layers_0"]["attention"]
  query_std = float(np.std(attention["query"]["kernel"]))
  key_std = float(np.std(attention["key"]["kernel"]))
  np.testing.assert_allclose(query_std, (64 * 16) ** -0.5, rtol=0.1)
  np.testing.assert_allclose(key_std, 64 ** -0.5, rtol=0.1)
  np.testing.assert_allclose(float(np.std(params["token_embedder"]["embedding"])), 1.0,
                             rtol=0.1)


def test_config_validation_and_dict_round_trip():
  with pytest.raises(ValueError, match="feed_forward"):
    dataclasses.replace(TINY, feed_forward="swish")
  with pytest.raises(ValueError, match="unknown names"):
    t5.LoraConfig(targets=("query", "qurey"))
  config = dataclasses.replace(TINY, adapter=t5.AdapterConfig(4),
                               lora=t5.LoraConfig(targets=("wo",)))
  assert t5.T5Config.from_dict(config.to_dict()) == config
  with pytest.raises(ValueError, match="d_modle"):
    t5.T5Config.from_dict({**config.to_dict(), "d_modle": 3})


# Relative positions.


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (7, 19), (8, 20), (33, 77)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_hugging_face(num_buckets, max_distance,
                                                       bidirectional):
  relative = np.arange(-3 * max_distance, 3 * max_distance + 1)[None, :]
  expected = modeling_t5.T5Attention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance).numpy()
  got = layers.relative_position_bucket(relative, bidirectional=bidirectional,
                                        num_buckets=num_buckets, max_distance=max_distance)
  np.testing.assert_array_equal(got, expected)


def test_traced_positions_give_the_static_bias():
  module = layers.RelativePositionBias(3, 7, 19, bidirectional=False)
  positions = np.arange(45, dtype=np.int32)[None]
  variables = module.init(jax.random.key(0), positions, positions)
  static = module.apply(variables, positions, positions)
  traced = jax.jit(module.apply)(variables, positions, positions)
  np.testing.assert_array_equal(np.asarray(static), np.asarray(traced))


# Masks, packing, scoring.


def test_appending_padding_leaves_real_logits_unchanged():
  params = _params(TINY)
  rng = np.random.default_rng(1)
  inputs, targets = _example(rng, 7, 5)
  short = _logits(TINY, params, encoder_input_tokens=inputs[None],
                  decoder_input_tokens=_shift_right(targets)[None],
                  decoder_target_tokens=targets[None])
  padded_targets = _pad(targets, 9)
  long = _logits(TINY, params, encoder_input_tokens=_pad(inputs, 12)[None],
                 decoder_input_tokens=_shift_right(padded_targets)[None],
                 decoder_target_tokens=padded_targets[None])
  np.testing.assert_allclose(long[:, :5], short, atol=1e-5)


def test_decoder_is_causal():
  params = _params(TINY)
  batch = _batch()
  changed = np.array(batch["dec_in"])
  changed[:, 4] = (changed[:, 4] + 1) % TINY.vocab_size + 1
  base = _logits(TINY, params, encoder_input_tokens=batch["inputs"],
                 decoder_input_tokens=batch["dec_in"])
  other = _logits(TINY, params, encoder_input_tokens=batch["inputs"],
                  decoder_input_tokens=changed)
  np.testing.assert_array_equal(other[:, :4], base[:, :4])
  assert not np.allclose(other[:, 4:], base[:, 4:], atol=1e-4)


def test_packed_examples_match_each_example_alone():
  params = _params(TINY)
  rng = np.random.default_rng(2)
  (in_a, tg_a), (in_b, tg_b) = _example(rng, 6, 4), _example(rng, 5, 6)
  alone = [_logits(TINY, params, encoder_input_tokens=i[None],
                   decoder_input_tokens=_shift_right(t)[None],
                   decoder_target_tokens=t[None]) for i, t in ((in_a, tg_a), (in_b, tg_b))]

  def packed(a, b, length):
    return _pad(np.concatenate([a, b]), length)[None]

  def segments(len_a, len_b, length):
    return packed(np.full(len_a, 1), np.full(len_b, 2), length)

  def positions(len_a, len_b, length):
    return packed(np.arange(len_a), np.arange(len_b), length)

  logits = _logits(
      TINY, params,
      encoder_input_tokens=packed(in_a, in_b, 13),
      decoder_input_tokens=packed(_shift_right(tg_a), _shift_right(tg_b), 12),
      decoder_target_tokens=packed(tg_a, tg_b, 12),
      encoder_segment_ids=segments(6, 5, 13), decoder_segment_ids=segments(4, 6, 12),
      encoder_positions=positions(6, 5, 13), decoder_positions=positions(4, 6, 12))
  np.testing.assert_allclose(logits[:, :4], alone[0], atol=1e-5)
  np.testing.assert_allclose(logits[:, 4:10], alone[1], atol=1e-5)


def test_scorer_layout_matches_each_choice_alone():
  """Choices packed in one decoder row, decoder segment ids only, padded encoder."""
  params = _params(TINY)
  rng = np.random.default_rng(3)
  inputs = _pad(_example(rng, 6, 2)[0], 9)[None]
  choices = [np.append(_random_tokens(rng, (n,)), EOS).astype(np.int32) for n in (2, 1, 4)]
  alone = [_logits(TINY, params, encoder_input_tokens=inputs,
                   decoder_input_tokens=_shift_right(c)[None],
                   decoder_target_tokens=c[None]) for c in choices]

  def row(parts):
    return _pad(np.concatenate(parts), 14)[None]
  logits = _logits(
      TINY, params, encoder_input_tokens=inputs,
      decoder_input_tokens=row([_shift_right(c) for c in choices]),
      decoder_target_tokens=row(choices),
      decoder_segment_ids=row([np.full(len(c), i + 1) for i, c in enumerate(choices)]),
      decoder_positions=row([np.arange(len(c)) for c in choices]))
  start = 0
  for choice, expected in zip(choices, alone):
    np.testing.assert_allclose(logits[:, start:start + len(choice)], expected, atol=1e-5)
    start += len(choice)


# Cached decoding.


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_cached_decoding_matches_teacher_forcing(scan):
  config = dataclasses.replace(TINY, scan_layers=scan)
  params = _params(TINY)
  if scan:
    params = t5.stack_layers(params)
  batch = _batch(seed=4, enc_len=8, dec_len=6)
  model = t5.T5(config)
  expected = model.apply({"params": params}, batch["inputs"], batch["dec_in"])
  encoded = model.apply({"params": params}, batch["inputs"], method=t5.T5.encode)
  _, state = model.apply({"params": params}, encoded, batch["inputs"],
                         jnp.zeros_like(batch["dec_in"]), decode=True,
                         mutable=["cache"], method=t5.T5.decode)

  @jax.jit
  def step(cache, tokens):
    return model.apply({"params": params, "cache": cache}, encoded, batch["inputs"],
                       tokens, decode=True, mutable=["cache"], method=t5.T5.decode)
  cache = state["cache"]
  steps = []
  for t in range(batch["dec_in"].shape[1]):
    logits, state = step(cache, batch["dec_in"][:, t:t + 1])
    cache = state["cache"]
    steps.append(logits)
  assert int(cache["decoder"]["cache_index"]) == batch["dec_in"].shape[1]
  np.testing.assert_allclose(np.concatenate(steps, 1), expected, atol=1e-5)


def test_decode_mode_rejects_segment_ids():
  params = _params(TINY)
  batch = _batch()
  with pytest.raises(ValueError, match="decode=True"):
    t5.T5(TINY).apply({"params": params}, jnp.zeros((2, 9, 40)), batch["inputs"],
                      batch["dec_in"], decoder_segment_ids=jnp.ones_like(batch["dec_in"]),
                      decode=True, mutable=["cache"], method=t5.T5.decode)


# Layouts, remat, precision, dropout.


def test_scanned_and_unscanned_layers_give_the_same_logits():
  params = _params(TINY)
  stacked = t5.stack_layers(params)
  assert stacked["decoder"]["layers"]["mlp"]["wo"]["kernel"].shape == (3, 52, 40)
  abstract = nn.meta.unbox(
      t5.abstract_variables(dataclasses.replace(TINY, scan_layers=True))["params"])
  assert (jax.tree_util.tree_map(lambda x: x.shape, stacked)
          == jax.tree_util.tree_map(lambda x: x.shape, abstract))
  batch = _batch()
  features = dict(encoder_input_tokens=batch["inputs"], decoder_input_tokens=batch["dec_in"],
                  decoder_target_tokens=batch["targets"])
  scanned = _logits(dataclasses.replace(TINY, scan_layers=True), stacked, **features)
  np.testing.assert_allclose(scanned, _logits(TINY, params, **features), atol=1e-5)
  restored = t5.unstack_layers(stacked)
  assert jax.tree_util.tree_all(
      jax.tree_util.tree_map(lambda a, b: bool(jnp.array_equal(a, b)), restored, params))


def test_stack_layers_rejects_gaps_and_mixed_layouts():
  layer = {"scale": np.ones(3, np.float32)}
  with pytest.raises(ValueError, match="without gaps"):
    t5.stack_layers({"layers_0": layer, "layers_2": layer})
  with pytest.raises(ValueError, match="mixes"):
    t5.stack_layers({"layers_0": layer, "layers": layer})
  stacked = t5.stack_layers({"encoder": {"layers_0": layer, "layers_1": layer}})
  assert isinstance(stacked["encoder"]["layers"]["scale"], np.ndarray)
  assert stacked["encoder"]["layers"]["scale"].shape == (2, 3)


def test_remat_gives_the_same_loss_and_gradients():
  params = _params(TINY)
  batch = _batch()
  loss, grads = jax.jit(jax.value_and_grad(
      functools.partial(_cross_entropy_loss, TINY)))(params, batch)
  for policy in ("full", "dots"):
    remat = dataclasses.replace(TINY, remat_policy=policy)
    remat_loss, remat_grads = jax.jit(jax.value_and_grad(
        functools.partial(_cross_entropy_loss, remat)))(params, batch)
    np.testing.assert_allclose(remat_loss, loss, rtol=1e-6, err_msg=policy)
    jax.tree_util.tree_map(
        functools.partial(np.testing.assert_allclose, atol=1e-5, err_msg=policy),
        remat_grads, grads)


def test_bfloat16_activations_are_close_to_float32():
  bf16 = dataclasses.replace(TINY, dtype="bfloat16")
  params = _params(TINY)
  batch = _batch()
  features = dict(encoder_input_tokens=batch["inputs"], decoder_input_tokens=batch["dec_in"])
  encoded = t5.T5(bf16).apply({"params": params}, batch["inputs"], method=t5.T5.encode)
  assert encoded.dtype == jnp.bfloat16
  low = _logits(bf16, params, **features)
  full = _logits(TINY, params, **features)
  assert low.dtype == np.float32
  assert np.abs(low - full).max() < 0.05 * np.abs(full).max()
  assert np.mean(np.argmax(low, -1) == np.argmax(full, -1)) > 0.9


def test_dropout_uses_the_dropout_stream():
  params = _params(TINY)
  batch = _batch()
  model = t5.T5(TINY)

  @jax.jit
  def run(rng):
    return model.apply({"params": params}, batch["inputs"], batch["dec_in"],
                       enable_dropout=True, rngs={"dropout": rng})
  first = run(jax.random.key(1))
  np.testing.assert_array_equal(run(jax.random.key(1)), first)
  assert not np.allclose(run(jax.random.key(2)), first)
  deterministic = _logits(TINY, params, encoder_input_tokens=batch["inputs"],
                          decoder_input_tokens=batch["dec_in"])
  assert not np.allclose(first, deterministic)


def test_tied_output_is_rescaled_and_untied_is_not():
  batch = _batch()
  for config, tied in ((TINY_V10, True), (TINY, False)):
    params = _params(config)
    logits, state = t5.T5(config).apply(
        {"params": params}, batch["inputs"], batch["dec_in"],
        capture_intermediates=lambda mdl, _: mdl.name == "decoder_norm")
    hidden = state["intermediates"]["decoder"]["decoder_norm"]["__call__"][0]
    if tied:
      expected = (hidden * TINY.d_model ** -0.5) @ params["token_embedder"]["embedding"].T
    else:
      expected = hidden @ params["decoder"]["logits_dense"]["kernel"]
    np.testing.assert_allclose(logits, expected, atol=1e-5, err_msg=f"tied={tied}")


# Adapters and LoRA.


def _flat(tree):
  return {"/".join(str(p.key) for p in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _without(params, predicate):
  if isinstance(params, dict):
    return {k: _without(v, predicate) for k, v in params.items() if not predicate(k)}
  return params


def test_new_adapters_are_identity():
  config = dataclasses.replace(TINY, adapter=t5.AdapterConfig(reduction_factor=8))
  params = _params(config)
  added = set(_flat(params)) - set(_flat(_params(TINY)))
  width = 40 // 8
  expected = {}
  for stack, num, names in (("encoder", 2, ("attention_adapter", "mlp_adapter")),
                            ("decoder", 3, ("self_attention_adapter", "mlp_adapter"))):
    for i in range(num):
      for name in names:
        expected[f"{stack}/layers_{i}/{name}/down/kernel"] = (40, width)
        expected[f"{stack}/layers_{i}/{name}/up/kernel"] = (width, 40)
  assert {k: _flat(params)[k] for k in added} == expected

  batch = _batch()
  features = dict(encoder_input_tokens=batch["inputs"], decoder_input_tokens=batch["dec_in"])
  base = _without(params, lambda k: k.endswith("_adapter"))
  np.testing.assert_array_equal(_logits(config, params, **features),
                                _logits(TINY, base, **features))
  nudged = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.1 if "up" in str(p) else x, params)
  assert not np.allclose(_logits(config, nudged, **features), _logits(TINY, base, **features))


def _merge_lora(tree, scale):
  """Folds every `lora_a @ lora_b * scale` into its kernel and drops the factors."""
  if "lora_a" in tree:
    return {"kernel": tree["kernel"] + tree["lora_a"] @ tree["lora_b"] * scale}
  return {k: _merge_lora(v, scale) if isinstance(v, dict) else v for k, v in tree.items()}


def test_lora_params_and_merged_kernel():
  lora = t5.LoraConfig(rank=3, alpha=6.0, targets=("query", "value", "wi_1", "wo"))
  config = dataclasses.replace(TINY, lora=lora)
  params = _params(config)
  added = {k: v for k, v in _flat(params).items() if k not in _flat(_params(TINY))}
  assert all(k.rsplit("/", 2)[-2] in lora.targets for k in added)
  assert added["decoder/layers_1/encoder_decoder_attention/value/lora_a"] == (40, 3)
  assert added["decoder/layers_1/encoder_decoder_attention/value/lora_b"] == (3, 18)
  assert added["encoder/layers_0/mlp/wo/lora_a"] == (52, 3)
  # query and value in 2 encoder + 6 decoder attentions, wi_1 and wo in 5 layers.
  assert len(added) == 2 * (2 * 8 + 2 * 5)

  batch = _batch()
  features = dict(encoder_input_tokens=batch["inputs"], decoder_input_tokens=batch["dec_in"])
  base_logits = _logits(TINY, _merge_lora(params, 2.0), **features)
  np.testing.assert_array_equal(_logits(config, params, **features), base_logits)
  # A trained (non-zero) lora_b acts like the merged kernel W + A B alpha / rank.
  trained = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.05 if "lora_b" in str(p) else x, params)
  logits = _logits(config, trained, **features)
  np.testing.assert_allclose(logits, _logits(TINY, _merge_lora(trained, 2.0), **features),
                             atol=1e-5)
  assert not np.allclose(logits, base_logits, atol=1e-4)
