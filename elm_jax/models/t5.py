"""T5 v1.0, v1.1 and LM-adapted encoder-decoders in Flax linen, with adapters and LoRA.

Parameter names, shapes and logical axes follow docs/architecture.md ("The T5
model"), which uses T5X's names. Parameters are float32; activations run in
`T5Config.dtype`; logits are float32.

Masks: token 0 is padding. The encoder masks padded keys; the decoder is causal
and, given `decoder_target_tokens`, masks keys whose target is 0; cross-attention
masks padded encoder keys. Segment ids restrict attention to equal segments;
with only `decoder_segment_ids` (the rank-classification layout, several answer
choices packed in one decoder row) each decoder segment sees the whole
unpadded encoder input. Relative positions come from `*_positions` when given.

Cached decoding (what greedy and beam search build on):

  model = T5(config)
  encoded = model.apply({"params": params}, enc_tokens, method=T5.encode)
  # 1. Create the cache: a full-length decoder input (its values are not used
  #    for the cache contents), decode=True, the "cache" collection mutable.
  _, state = model.apply({"params": params}, encoded, enc_tokens,
                         jnp.zeros((batch, max_decode_length), jnp.int32),
                         decode=True, mutable=["cache"], method=T5.decode)
  cache = state["cache"]
  # 2. One token per call; token t sits at decoder position t (the first is 0).
  logits, state = model.apply({"params": params, "cache": cache}, encoded,
                              enc_tokens, tokens[:, None], decode=True,
                              mutable=["cache"], method=T5.decode)
  cache = state["cache"]  # logits: float32 [batch, 1, vocab]

The cache holds `decoder/cache_index` (int32 scalar, the position of the next
token) and, per layer, `self_attention/cached_{key,value}` `[batch,
max_decode_length, heads, d_kv]` and `encoder_decoder_attention/cached_{key,value}`
`[batch, enc_len, heads, d_kv]` (projected once from `encoded` in step 1; later
calls ignore `encoded` but still need `encoder_input_tokens` for the padding
mask). With `scan_layers` the per-layer arrays gain a layer axis at position 1,
so every cache array except `cache_index` has the batch on axis 0: beam search
may expand or reorder the batch with one function over all leaves but
`cache_index`. Decoding past `max_decode_length` is not detected.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax.models import layers

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = ("none", "full", "dots")
_FEED_FORWARDS = ("gated-gelu", "relu")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  """Houlsby bottleneck adapters after self-attention and feed-forward blocks."""
  reduction_factor: int = 32  # width = d_model // reduction_factor
  train_layer_norms: bool = True

  def __post_init__(self):
    if self.reduction_factor < 1:
      raise ValueError(f"AdapterConfig.reduction_factor must be >= 1, got {self.reduction_factor}.")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank updates `x @ lora_a @ lora_b * alpha / rank` on the named projections."""
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ("query", "value")

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    unknown = [t for t in self.targets if t not in layers.LORA_TARGETS]
    if unknown:
      raise ValueError(f"LoraConfig.targets has unknown names {unknown}; "
                       f"choose from {list(layers.LORA_TARGETS)}.")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank must be >= 1, got {self.rank}.")


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Architecture and execution options of a T5 model."""
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_heads: int
  num_encoder_layers: int
  num_decoder_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward: str = "gated-gelu"  # or "relu" (T5 v1.0)
  tie_word_embeddings: bool = False  # True for T5 v1.0
  dtype: str = "float32"  # activations; parameters are always float32
  remat_policy: str = "none"  # "none" | "full" | "dots"
  scan_layers: bool = False
  adapter: AdapterConfig | None = None
  lora: LoraConfig | None = None

  def __post_init__(self):
    def check(name, ok, allowed):
      if not ok:
        raise ValueError(f"T5Config.{name}={getattr(self, name)!r} is invalid; {allowed}.")
    check("feed_forward", self.feed_forward in _FEED_FORWARDS, f"use one of {_FEED_FORWARDS}")
    check("dtype", self.dtype in _DTYPES, f"use one of {tuple(_DTYPES)}")
    check("remat_policy", self.remat_policy in _REMAT_POLICIES,
          f"use one of {_REMAT_POLICIES}")
    for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
                 "num_encoder_layers", "num_decoder_layers"):
      check(name, getattr(self, name) >= 1, "it must be a positive integer")
    check("relative_attention_num_buckets", self.relative_attention_num_buckets >= 4,
          "it must be at least 4")
    check("relative_attention_max_distance",
          self.relative_attention_max_distance > self.relative_attention_num_buckets // 2,
          "it must exceed relative_attention_num_buckets // 2")
    if self.adapter is not None:
      check("adapter", self.d_model // self.adapter.reduction_factor >= 1,
            "d_model // reduction_factor must be at least 1")

  @property
  def activation_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def adapter_width(self) -> int:
    return 0 if self.adapter is None else self.d_model // self.adapter.reduction_factor

  def to_dict(self) -> dict[str, Any]:
    """Returns a JSON-ready dict (nested configs as dicts or None)."""
    d = dataclasses.asdict(self)
    if d["lora"] is not None:
      d["lora"]["targets"] = list(d["lora"]["targets"])
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
    """Builds a config from `to_dict` output. Unknown keys raise a ValueError naming them."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown T5Config keys {unknown}; known keys: {sorted(known)}.")
    d = dict(d)
    if d.get("adapter") is not None:
      d["adapter"] = AdapterConfig(**d["adapter"])
    if d.get("lora") is not None:
      d["lora"] = LoraConfig(**{**d["lora"], "targets": tuple(d["lora"]["targets"])})
    return cls(**d)

  def num_params_estimate(self) -> int:
    """Returns the exact parameter count of the model this config builds."""
    e, joined, ff = self.d_model, self.num_heads * self.d_kv, self.d_ff
    wis = ("wi_0", "wi_1") if self.feed_forward == "gated-gelu" else ("wi",)
    shapes = {"query": (e, joined), "key": (e, joined), "value": (e, joined),
              "out": (joined, e), "wo": (ff, e), **{w: (e, ff) for w in wis}}

    def block(names):
      total = 0
      for name in names:
        fan_in, fan_out = shapes[name]
        total += fan_in * fan_out
        if self.lora is not None and name in self.lora.targets:
          total += self.lora.rank * (fan_in + fan_out)
      return total

    attention = block(("query", "key", "value", "out"))
    mlp = block(wis + ("wo",))
    adapter = 2 * e * self.adapter_width
    encoder_layer = attention + mlp + 2 * e + (2 * adapter if self.adapter else 0)
    decoder_layer = 2 * attention + mlp + 3 * e + (2 * adapter if self.adapter else 0)
    relpos = self.num_heads * self.relative_attention_num_buckets
    total = self.vocab_size * e
    total += relpos + self.num_encoder_layers * encoder_layer + e
    total += relpos + self.num_decoder_layers * decoder_layer + e
    if not self.tie_word_embeddings:
      total += e * self.vocab_size
    return total


def _lora_specs(config: T5Config) -> dict[str, layers.LoraSpec] | None:
  if config.lora is None:
    return None
  spec = layers.LoraSpec(config.lora.rank, config.lora.alpha / config.lora.rank)
  return {name: spec for name in config.lora.targets}


def _constrain_embed(x: Array) -> Array:
  return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _mask_bias(mask: Array) -> Array:
  return jnp.where(mask, 0.0, layers.NEG_INF).astype(jnp.float32)


class _Sublayer(nn.Module):
  """Base of the encoder and decoder layers: norms, attention, residual, feed-forward."""
  config: T5Config
  deterministic: bool = True
  decode: bool = False
  scanned: bool = False

  def norm(self, name):
    return layers.RmsNorm(self.config.layer_norm_epsilon, self.config.activation_dtype,
                          name=name)

  def attention(self, name, kind):
    c = self.config
    return layers.MultiHeadAttention(c.num_heads, c.d_kv, kind, c.dropout_rate,
                                     c.activation_dtype, _lora_specs(c), name=name)

  def residual(self, x, y, adapter_name):
    """Applies dropout to the sublayer output, then its adapter, then the residual add."""
    y = nn.Dropout(self.config.dropout_rate)(y, deterministic=self.deterministic)
    if adapter_name is not None and self.config.adapter is not None:
      y = layers.Adapter(self.config.adapter_width, self.config.activation_dtype,
                         name=adapter_name)(y)
    return _constrain_embed(x + y)

  def mlp_sublayer(self, x):
    c = self.config
    y = self.norm("pre_mlp_layer_norm")(x)
    y = layers.MlpBlock(c.d_ff, c.feed_forward, c.dropout_rate, c.activation_dtype,
                        _lora_specs(c), name="mlp")(y, self.deterministic)
    return self.residual(x, y, "mlp_adapter")


class EncoderLayer(_Sublayer):

  @nn.compact
  def __call__(self, x: Array, bias: Array):
    """x `[batch, length, embed]`; bias float32 `[batch or 1, heads or 1, length, length]`."""
    y = self.norm("pre_attention_layer_norm")(x)
    y = self.attention("attention", "self")(y, y, bias, deterministic=self.deterministic)
    x = self.residual(x, y, "attention_adapter")
    x = self.mlp_sublayer(x)
    return (x, None) if self.scanned else x


class DecoderLayer(_Sublayer):

  @nn.compact
  def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
               decode_index: Array | None):
    y = self.norm("pre_self_attention_layer_norm")(x)
    y = self.attention("self_attention", "self")(
        y, y, self_bias, deterministic=self.deterministic, decode=self.decode,
        decode_index=decode_index)
    x = self.residual(x, y, "self_attention_adapter")
    y = self.norm("pre_cross_attention_layer_norm")(x)
    y = self.attention("encoder_decoder_attention", "cross")(
        y, encoded, cross_bias, deterministic=self.deterministic, decode=self.decode)
    x = self.residual(x, y, None)
    x = self.mlp_sublayer(x)
    return (x, None) if self.scanned else x


def _run_layers(layer_cls, num_layers: int, config: T5Config, x: Array, *args,
                deterministic: bool, decode: bool = False) -> Array:
  """Applies `num_layers` layers, unrolled (`layers_{i}`) or scanned (`layers`)."""
  if config.remat_policy != "none" and not decode:
    policy = (jax.checkpoint_policies.checkpoint_dots if config.remat_policy == "dots"
              else None)
    layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not config.scan_layers)
  kwargs = dict(config=config, deterministic=deterministic, decode=decode)
  if config.scan_layers:
    scanned = nn.scan(
        layer_cls,
        variable_axes={"params": 0, "cache": 1},  # cache: batch stays on axis 0
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scanned(**kwargs, scanned=True, name="layers")(x, *args)
    return x
  for i in range(num_layers):
    x = layer_cls(**kwargs, name=f"layers_{i}")(x, *args)
  return x


def _positions(length: int) -> np.ndarray:
  return np.arange(length, dtype=np.int32)[None]  # [1, length]


class Encoder(nn.Module):
  """T5 encoder stack: embedding, layers, final norm (relative positions shared)."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, tokens, segment_ids, positions, deterministic):
    c = self.config
    x = self.shared_embedding(tokens)  # [batch, length, embed]
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    x = _constrain_embed(x)

    mask = (tokens > 0)[:, None, None, :]  # [batch, 1, 1, k_len]
    if segment_ids is not None:
      mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    if positions is None:
      positions = _positions(tokens.shape[1])
    relpos = layers.RelativePositionBias(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        bidirectional=True, name="relpos_bias")(positions, positions)
    bias = relpos + _mask_bias(mask)  # [batch, heads, length, length]

    x = _run_layers(EncoderLayer, c.num_encoder_layers, c, x, bias,
                    deterministic=deterministic)
    x = layers.RmsNorm(c.layer_norm_epsilon, c.activation_dtype, name="encoder_norm")(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    return _constrain_embed(x)


def _cached_decode_length(cache: Mapping[str, Any]) -> int:
  for path, leaf in jax.tree_util.tree_flatten_with_path(cache)[0]:
    names = [getattr(p, "key", None) for p in path]
    if names[-2:] == ["self_attention", "cached_key"]:
      return leaf.shape[-3]
  raise ValueError("The decoder cache contains no self-attention keys; create it first "
                   "(see the module docstring of elm_jax/models/t5.py).")


class Decoder(nn.Module):
  """T5 decoder stack, teacher-forced or one cached token per call."""
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
               decoder_positions, deterministic, decode):
    c = self.config
    relpos_fn = layers.RelativePositionBias(
        c.num_heads, c.relative_attention_num_buckets, c.relative_attention_max_distance,
        bidirectional=False, name="relpos_bias")
    length = decoder_input_tokens.shape[1]
    decode_index = None
    stepping = decode and self.has_variable("cache", "cache_index")

    if stepping:
      # One token at the cache index, attending to every cached position <= it.
      index_var = self.variable("cache", "cache_index")
      decode_index = index_var.value
      max_length = _cached_decode_length(self.variables["cache"])
      keys = _positions(max_length)
      self_bias = relpos_fn(jnp.reshape(decode_index, (1, 1)), jnp.asarray(keys))
      self_bias = self_bias + _mask_bias(jnp.asarray(keys) <= decode_index)[:, None]
      cross_mask = (encoder_input_tokens > 0)[:, None, None, :]
      index_var.value = decode_index + 1
    else:
      if decode:
        self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
      idx = np.arange(length)
      mask = jnp.asarray(idx[:, None] >= idx[None, :])[None, None]  # [1, 1, q, k]
      if decoder_target_tokens is not None:
        mask = mask & (decoder_target_tokens > 0)[:, None, None, :]
      if decoder_segment_ids is not None:
        mask = mask & (decoder_segment_ids[:, None, :, None]
                       == decoder_segment_ids[:, None, None, :])
      if decoder_positions is None:
        decoder_positions = _positions(length)
      self_bias = relpos_fn(decoder_positions, decoder_positions) + _mask_bias(mask)
      cross_mask = (encoder_input_tokens > 0)[:, None, None, :]  # [batch, 1, 1, enc_len]
      if encoder_segment_ids is not None and decoder_segment_ids is not None:
        cross_mask = cross_mask & (decoder_segment_ids[:, None, :, None]
                                   == encoder_segment_ids[:, None, None, :])
    cross_bias = _mask_bias(cross_mask)

    x = self.shared_embedding(decoder_input_tokens)  # [batch, length, embed]
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)
    x = _constrain_embed(x)
    x = _run_layers(DecoderLayer, c.num_decoder_layers, c, x, encoded, self_bias,
                    cross_bias, decode_index, deterministic=deterministic, decode=decode)
    x = layers.RmsNorm(c.layer_norm_epsilon, c.activation_dtype, name="decoder_norm")(x)
    x = nn.Dropout(c.dropout_rate)(x, deterministic=deterministic)

    if c.tie_word_embeddings:
      # T5 v1.0 rescales before the tied projection; v1.1 is untied and does not.
      logits = self.shared_embedding.attend(x * (c.d_model ** -0.5))
    else:
      logits = layers.Dense(c.vocab_size, ("embed", "vocab"), layers.mlp_kernel_init,
                            c.activation_dtype, name="logits_dense")(x)
    logits = jnp.asarray(logits, jnp.float32)  # [batch, length, vocab]
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
  """Encoder-decoder T5. The module docstring describes masks and caching."""
  config: T5Config

  def setup(self):
    c = self.config
    self.token_embedder = layers.Embed(c.vocab_size, c.d_model, c.activation_dtype)
    self.encoder = Encoder(c, self.token_embedder)
    self.decoder = Decoder(c, self.token_embedder)

  def encode(self, encoder_input_tokens, *, encoder_segment_ids=None,
             encoder_positions=None, enable_dropout=False) -> Array:
    """Returns the encoder output `[batch, enc_len, d_model]` in the activation dtype."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                        not enable_dropout)

  def decode(self, encoded, encoder_input_tokens, decoder_input_tokens,
             decoder_target_tokens=None, *, encoder_segment_ids=None,
             decoder_segment_ids=None, decoder_positions=None, enable_dropout=False,
             decode=False) -> Array:
    """Returns float32 logits `[batch, dec_len, vocab]`."""
    if decode and (decoder_segment_ids is not None or decoder_positions is not None
                   or encoder_segment_ids is not None):
      raise ValueError("Invalid arguments: decode=True takes positions from the cache "
                       "index, so pass no segment ids and no decoder_positions.")
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                        decoder_target_tokens, encoder_segment_ids, decoder_segment_ids,
                        decoder_positions, not enable_dropout, decode)

  def __call__(self, encoder_input_tokens, decoder_input_tokens,
               decoder_target_tokens=None, *, encoder_segment_ids=None,
               decoder_segment_ids=None, encoder_positions=None, decoder_positions=None,
               enable_dropout=False) -> Array:
    """Returns teacher-forced logits, float32 `[batch, dec_len, vocab]`."""
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids=encoder_segment_ids,
                          encoder_positions=encoder_positions,
                          enable_dropout=enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                       decoder_target_tokens, encoder_segment_ids=encoder_segment_ids,
                       decoder_segment_ids=decoder_segment_ids,
                       decoder_positions=decoder_positions, enable_dropout=enable_dropout)


# Helpers for callers.


def _dummy_batch(batch_size: int, encoder_length: int, decoder_length: int):
  enc = jnp.ones((batch_size, encoder_length), jnp.int32)
  dec = jnp.ones((batch_size, decoder_length), jnp.int32)
  return enc, dec


def init_variables(config: T5Config, rng: Array, *, batch_size: int = 1,
                   encoder_length: int = 8, decoder_length: int = 8) -> dict[str, Any]:
  """Initializes `T5(config)` on a dummy batch. Parameters stay boxed with their axis names."""
  enc, dec = _dummy_batch(batch_size, encoder_length, decoder_length)
  return T5(config).init({"params": rng}, enc, dec, dec)


def abstract_variables(config: T5Config, *, batch_size: int = 1, encoder_length: int = 8,
                       decoder_length: int = 8) -> dict[str, Any]:
  """Returns the shapes and logical axes of the variables without allocating them."""
  return jax.eval_shape(
      lambda rng: init_variables(config, rng, batch_size=batch_size,
                                 encoder_length=encoder_length,
                                 decoder_length=decoder_length),
      jax.random.key(0))


def init_params(config: T5Config, rng: Array, *, batch_size: int = 1,
                encoder_length: int = 8, decoder_length: int = 8) -> dict[str, Any]:
  """Returns randomly initialized parameters as a plain nested dict of float32 arrays."""
  init = jax.jit(lambda r: init_variables(config, r, batch_size=batch_size,
                                          encoder_length=encoder_length,
                                          decoder_length=decoder_length))
  return _to_dict(nn.meta.unbox(init(rng)["params"]))


def count_params(params: Any) -> int:
  """Counts the scalars in a parameter tree (arrays or shape structs)."""
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def _to_dict(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


_LAYER_KEY = re.compile(r"layers_(\d+)$")


def _stack(*arrays):
  # Host (numpy) weights stay on the host, so converting a large checkpoint does
  # not place a second copy of it on the default device.
  if all(isinstance(x, np.ndarray) for x in arrays):
    return np.stack(arrays)
  return jnp.stack(arrays)


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Converts to the scanned layout: `layers_{i}/...` become `layers/...`, axis 0 the layer.

  Works on any subtree of the parameters (for example adapter-only trees).
  """
  out = {}
  indexed = {}
  for key, value in params.items():
    match = _LAYER_KEY.match(key)
    if match:
      indexed[int(match.group(1))] = value
    else:
      out[key] = stack_layers(value) if isinstance(value, Mapping) else value
  if indexed:
    if sorted(indexed) != list(range(len(indexed))):
      raise ValueError(f"Invalid layer keys: layers_{{i}} must run from 0 without gaps, got "
                       f"{sorted(indexed)}.")
    if "layers" in out:
      raise ValueError("Invalid parameter tree: it contains both 'layers' and 'layers_{i}' "
                       "keys, so it mixes the scanned and unscanned layouts.")
    per_layer = [_to_dict(indexed[i]) for i in range(len(indexed))]
    out["layers"] = jax.tree_util.tree_map(_stack, *per_layer)
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Converts to the unscanned layout, the inverse of `stack_layers`."""
  out = {}
  for key, value in params.items():
    if key == "layers":
      leaves = jax.tree_util.tree_leaves(value)
      num_layers = leaves[0].shape[0]
      for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], _to_dict(value))
    else:
      out[key] = unstack_layers(value) if isinstance(value, Mapping) else value
  return out
