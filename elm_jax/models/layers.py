"""Building blocks of the T5 encoder-decoder in Flax linen.

Every parameter is float32 and carries logical axis names (see
`elm_jax.partitioning`); activations run in the dtype the caller passes.
Kernels are stored two-dimensional, `[in, out]`, as in T5X, so attention
projections are `[embed, joined_kv]` with `joined_kv = heads * d_kv`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Added to the attention logits of masked keys. Large but finite, so a query
# whose keys are all masked (a padding row) gets uniform weights, not NaN.
NEG_INF = -1e10

# Names a LoRA configuration may target, shared with the config validation.
LORA_TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wi", "wo")

# T5X initializers: fan-in variance scaling everywhere. The query projection is
# further divided by sqrt(d_kv), which is why attention logits are not scaled.
default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
mlp_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
embedding_init = nn.initializers.normal(stddev=1.0)
relpos_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
# Kaiming-uniform with a = sqrt(5): uniform in +-1/sqrt(fan_in), as LoRA's A.
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _constrain(x: Array, axes: tuple[str, ...]) -> Array:
  return nn.with_logical_constraint(x, axes)


def _param(module: nn.Module, name: str, init: Initializer, shape: tuple[int, ...],
           axes: tuple[str, ...]) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """LoRA settings of one projection: its rank and output scale."""
  rank: int
  scale: float


class RmsNorm(nn.Module):
  """T5 layer norm: scale only, no mean subtraction, computed in float32."""
  epsilon: float = 1e-6
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    x32 = jnp.asarray(x, jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(variance + self.epsilon) * scale
    return jnp.asarray(y, self.dtype)


class Dense(nn.Module):
  """Bias-free projection `[..., in] -> [..., out]`, optionally with LoRA."""
  features: int
  kernel_axes: tuple[str, str]
  kernel_init: Initializer = default_kernel_init
  dtype: DType = jnp.float32
  lora: LoraSpec | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    kernel = _param(self, "kernel", self.kernel_init, (in_features, self.features),
                    self.kernel_axes)
    x = jnp.asarray(x, self.dtype)
    y = jnp.dot(x, jnp.asarray(kernel, self.dtype))  # [..., out]
    if self.lora is not None:
      a = _param(self, "lora_a", lora_a_init, (in_features, self.lora.rank),
                 (self.kernel_axes[0], "lora_rank"))
      b = _param(self, "lora_b", nn.initializers.zeros, (self.lora.rank, self.features),
                 ("lora_rank", self.kernel_axes[1]))
      low = jnp.dot(x, jnp.asarray(a, self.dtype))  # [..., rank]
      y = y + jnp.dot(low, jnp.asarray(b, self.dtype)) * self.lora.scale
    return y


class Embed(nn.Module):
  """Token embedding; `attend` is the tied output projection (T5 v1.0)."""
  num_embeddings: int
  features: int
  dtype: DType = jnp.float32

  def setup(self):
    self.embedding = _param(self, "embedding", embedding_init,
                            (self.num_embeddings, self.features), ("vocab", "embed"))

  def __call__(self, tokens: Array) -> Array:
    x = jnp.take(self.embedding, tokens, axis=0)  # [batch, length, embed]
    return jnp.asarray(x, self.dtype)

  def attend(self, x: Array) -> Array:
    x = jnp.asarray(x, self.dtype)
    return jnp.dot(x, jnp.asarray(self.embedding, self.dtype).T)  # [..., vocab]


class Adapter(nn.Module):
  """Bottleneck adapter with its own residual: `x + up(gelu(down(x)))`.

  `up` starts at zero, so a freshly initialized adapter is the identity.
  """
  width: int
  dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = Dense(self.width, ("embed", "adapter"), mlp_kernel_init, self.dtype, name="down")(x)
    h = jax.nn.gelu(h, approximate=True)
    h = Dense(x.shape[-1], ("adapter", "embed"), nn.initializers.zeros, self.dtype,
              name="up")(h)
    return x + h


class MlpBlock(nn.Module):
  """T5 feed-forward: gated GELU (`wi_0` gelu branch, `wi_1` linear) or ReLU."""
  d_ff: int
  feed_forward: str = "gated-gelu"
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  lora: dict[str, LoraSpec] | None = None

  def _dense(self, name: str, features: int, axes: tuple[str, str]) -> Dense:
    spec = (self.lora or {}).get(name)
    return Dense(features, axes, mlp_kernel_init, self.dtype, spec, name=name)

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if self.feed_forward == "gated-gelu":
      gate = self._dense("wi_0", self.d_ff, ("embed", "mlp"))(x)  # [batch, length, mlp]
      linear = self._dense("wi_1", self.d_ff, ("embed", "mlp"))(x)
      h = jax.nn.gelu(gate, approximate=True) * linear
    else:
      h = jax.nn.relu(self._dense("wi", self.d_ff, ("embed", "mlp"))(x))
    h = _constrain(h, ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return self._dense("wo", x.shape[-1], ("mlp", "embed"))(h)  # [batch, length, embed]


class MultiHeadAttention(nn.Module):
  """T5 attention: no logit scaling, additive float32 bias (positions + mask).

  `kind` selects the decode-mode cache: "self" keeps keys and values of every
  decoded position, "cross" keeps the projected encoder keys and values, which
  are computed once in the cache-initialization call.
  """
  num_heads: int
  head_dim: int
  kind: str = "self"  # "self" | "cross"
  dropout_rate: float = 0.0
  dtype: DType = jnp.float32
  lora: dict[str, LoraSpec] | None = None

  def _dense(self, name: str, features: int, axes: tuple[str, str],
             init: Initializer) -> Dense:
    spec = (self.lora or {}).get(name)
    return Dense(features, axes, init, self.dtype, spec, name=name)

  def _heads(self, name: str, x: Array, init: Initializer) -> Array:
    joined = self.num_heads * self.head_dim
    y = self._dense(name, joined, ("embed", "joined_kv"), init)(x)  # [b, l, joined_kv]
    y = y.reshape(y.shape[:-1] + (self.num_heads, self.head_dim))  # [b, l, heads, kv]
    return _constrain(y, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array, *,
               deterministic: bool, decode: bool = False,
               decode_index: Array | None = None) -> Array:
    d_model = inputs_q.shape[-1]
    query_init = lambda *a: default_kernel_init(*a) / math.sqrt(self.head_dim)
    query = self._heads("query", inputs_q, query_init)

    if decode and self.kind == "cross":
      cached = self.has_variable("cache", "cached_key")
      if cached:
        key = self.get_variable("cache", "cached_key")
        value = self.get_variable("cache", "cached_value")
      else:
        key = self._heads("key", inputs_kv, default_kernel_init)
        value = self._heads("value", inputs_kv, default_kernel_init)
        self.put_variable("cache", "cached_key", key)
        self.put_variable("cache", "cached_value", value)
    else:
      key = self._heads("key", inputs_kv, default_kernel_init)
      value = self._heads("value", inputs_kv, default_kernel_init)
      if decode:
        cached = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape,
                                     value.dtype)
        if cached:
          if inputs_q.shape[1] != 1:
            raise ValueError(
                "Cached decoding takes one token per call; got a decoder input of "
                f"length {inputs_q.shape[1]}. Initialize the cache first (see t5.py).")
          start = (0, decode_index, 0, 0)
          key = jax.lax.dynamic_update_slice(cached_key.value, key, start)  # [b, max_len, h, kv]
          value = jax.lax.dynamic_update_slice(cached_value.value, value, start)
          cached_key.value = key
          cached_value.value = value

    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key)  # [batch, heads, q_len, k_len]
    logits = jnp.asarray(logits, jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
    weights = jnp.asarray(weights, self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)  # [batch, q_len, heads, kv]
    out = out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))  # [b, q, joined_kv]
    return self._dense("out", d_model, ("joined_kv", "embed"), default_kernel_init)(out)


def relative_position_bucket(relative_position: np.ndarray, *, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> np.ndarray:
  """T5's log-spaced bucket of `key_position - query_position`, in numpy.

  Follows Hugging Face's `T5Attention._relative_position_bucket` step by step
  in float32, so the buckets (and therefore converted checkpoints) agree.
  """
  relative_position = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
  else:
    distance = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  with np.errstate(divide="ignore"):
    scaled = np.log(distance.astype(np.float32) / np.float32(max_exact))
  scaled = scaled / np.float32(math.log(max_distance / max_exact))
  scaled = scaled * np.float32(num_buckets - max_exact)
  large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
  large = np.minimum(large, num_buckets - 1)
  return buckets + np.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """Relative position bias of one stack, table `rel_embedding` `[heads, relpos_buckets]`."""
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool

  def _bucket_fn(self, relative_position):
    return relative_position_bucket(
        relative_position, bidirectional=self.bidirectional,
        num_buckets=self.num_buckets, max_distance=self.max_distance)

  @nn.compact
  def __call__(self, query_positions, key_positions) -> Array:
    """Returns the bias `[batch or 1, heads, q_len, k_len]` in float32.

    Args:
      query_positions: int `[batch or 1, q_len]`, numpy (static) or traced.
      key_positions: int `[batch or 1, k_len]`.
    """
    table = _param(self, "rel_embedding", relpos_init, (self.num_heads, self.num_buckets),
                   ("heads", "relpos_buckets"))
    static = all(isinstance(p, np.ndarray) for p in (query_positions, key_positions))
    if static:
      relative = key_positions[:, None, :] - query_positions[:, :, None]  # [b, q, k]
      buckets = jnp.asarray(self._bucket_fn(relative), jnp.int32)
    else:
      # Beyond max_distance every distance falls in the last bucket, so a table
      # over [-max_distance, max_distance] gives the numpy buckets exactly.
      lookup = jnp.asarray(self._bucket_fn(
          np.arange(-self.max_distance, self.max_distance + 1)), jnp.int32)
      relative = (jnp.asarray(key_positions)[:, None, :]
                  - jnp.asarray(query_positions)[:, :, None])  # [b, q, k]
      relative = jnp.clip(relative, -self.max_distance, self.max_distance)
      buckets = lookup[relative + self.max_distance]
    bias = jnp.take(table, buckets, axis=1)  # [heads, b, q, k]
    return jnp.transpose(bias, (1, 0, 2, 3))  # [b, heads, q, k]
