"""Sentence embedders for the Expert Library: all-MiniLM-L6-v2 and a mean-pooled T5.

Every embedder has the same interface (`Embedder`): `embed(texts, max_length=...)`
returns L2-normalized float32 vectors, so a dot product is a cosine similarity, and
`fingerprint` identifies the model and settings that produced them. A library records
the fingerprint of its embedder and rejects queries embedded by another.

Batches are sorted by token length and padded to a few length buckets (powers of two
up to the maximum length), so a run compiles once per bucket, not once per batch.
"""

import dataclasses
import hashlib
import json
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from elm_jax import file_io

# Defaults for library entries and for queries, in tokens.
LIBRARY_MAX_LENGTH = 256
QUERY_MAX_LENGTH = 512


class Embedder(Protocol):
  """The sentence embedder interface that the library and the retriever use."""

  kind: str
  dim: int
  max_length: int

  @property
  def fingerprint(self) -> str:
    ...

  def embed(self, texts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
    """Returns float32 [len(texts), dim], each row L2-normalized."""
    ...


def length_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
  """Returns the padded lengths used for batches: powers of two, then max_length."""
  buckets = []
  length = smallest
  while length < max_length:
    buckets.append(length)
    length *= 2
  buckets.append(max_length)
  return tuple(buckets)


def _bucket_for(length: int, buckets: Sequence[int]) -> int:
  for bucket in buckets:
    if length <= bucket:
      return bucket
  return buckets[-1]


def _batch_rows(count: int, batch_size: int) -> int:
  """Rounds a short last batch up to a power of two, so few batch shapes compile."""
  rows = 1
  while rows < count:
    rows *= 2
  return min(rows, batch_size)


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """Means `hidden` [batch, length, dim] over positions where mask is 1, then L2-normalizes."""
  mask = mask.astype(hidden.dtype)[..., None]  # [batch, length, 1]
  summed = jnp.sum(hidden * mask, axis=1)  # [batch, dim]
  counts = jnp.maximum(jnp.sum(mask, axis=1), 1e-9)  # [batch, 1]
  pooled = summed / counts
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  # 1e-12 is the floor torch.nn.functional.normalize uses.
  return pooled / jnp.maximum(norm, 1e-12)


def run_bucketed(token_ids: Sequence[Sequence[int]], *, batch_size: int,
                 buckets: Sequence[int], dim: int,
                 forward: Callable[[np.ndarray, np.ndarray], jax.Array]) -> np.ndarray:
  """Runs `forward(ids [b, L], mask [b, L]) -> [b, dim]` over length-sorted buckets.

  Returns float32 [len(token_ids), dim] in the input order.
  """
  out = np.zeros((len(token_ids), dim), np.float32)
  order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    length = _bucket_for(max(len(token_ids[i]) for i in rows), buckets)
    height = _batch_rows(len(rows), batch_size)
    ids = np.zeros((height, length), np.int32)
    mask = np.zeros((height, length), np.int32)
    for r, i in enumerate(rows):
      seq = token_ids[i][:length]
      ids[r, :len(seq)] = seq
      mask[r, :len(seq)] = 1
    out[rows] = np.asarray(forward(ids, mask))[:len(rows)]
  return out


# --------------------------------------------------------------------------- BERT


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder: post-layer-norm, exact-erf GELU, absolute positions."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf_json(cls, path: str | os.PathLike[str]) -> "BertConfig":
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
    if raw.get("hidden_act", "gelu") != "gelu":
      raise ValueError(f"{path}: hidden_act {raw['hidden_act']!r} is not supported; "
                       "only 'gelu' (exact erf) is implemented.")
    if raw.get("position_embedding_type", "absolute") != "absolute":
      raise ValueError(f"{path}: position_embedding_type "
                       f"{raw['position_embedding_type']!r} is not supported.")
    return cls(vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
               num_layers=raw["num_hidden_layers"], num_heads=raw["num_attention_heads"],
               intermediate_size=raw["intermediate_size"],
               max_position_embeddings=raw["max_position_embeddings"],
               type_vocab_size=raw["type_vocab_size"],
               layer_norm_eps=raw["layer_norm_eps"])


class _BertLayer(nn.Module):
  config: BertConfig
  precision: Any

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_heads
    dense = lambda features, name: nn.Dense(features, precision=self.precision, name=name)
    layer_norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, name=name)

    def heads(t):  # [b, l, hidden] -> [b, l, heads, head_dim]
      return t.reshape(t.shape[:2] + (cfg.num_heads, head_dim))

    q = heads(dense(cfg.hidden_size, "query")(x))
    k = heads(dense(cfg.hidden_size, "key")(x))
    v = heads(dense(cfg.hidden_size, "value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=self.precision)
    logits = logits / np.sqrt(head_dim).astype(np.float32) + bias  # [b, h, q, k]
    weights = jax.nn.softmax(logits, axis=-1)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=self.precision)
    context = context.reshape(x.shape)  # [b, l, hidden]
    x = layer_norm("attention_norm")(x + dense(cfg.hidden_size, "attention_out")(context))

    hidden = jax.nn.gelu(dense(cfg.intermediate_size, "intermediate")(x), approximate=False)
    return layer_norm("output_norm")(x + dense(cfg.hidden_size, "output")(hidden))


class BertEncoder(nn.Module):
  """Returns the last hidden states [batch, length, hidden] of a BERT encoder."""
  config: BertConfig
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(input_ids)
         + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size,
                    name="position_embeddings")(positions)
         + nn.Embed(cfg.type_vocab_size, cfg.hidden_size,
                    name="token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="embeddings_norm")(x)
    # Additive mask over keys: [b, 1, 1, k].
    bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0,
                     jnp.finfo(jnp.float32).min).astype(jnp.float32)
    for i in range(cfg.num_layers):
      x = _BertLayer(cfg, self.precision, name=f"layers_{i}")(x, bias)
    return x


def bert_params_from_hf(weights: dict[str, np.ndarray], config: BertConfig) -> dict:
  """Maps Hugging Face BertModel tensor names onto BertEncoder's parameter tree."""

  def get(name):
    if name not in weights:
      raise KeyError(f"BERT weights have no tensor {name!r}; is this a BertModel "
                     "safetensors file?")
    return np.asarray(weights[name], np.float32)

  def dense(prefix):  # torch stores [out, in]; flax wants [in, out].
    return {"kernel": get(f"{prefix}.weight").T, "bias": get(f"{prefix}.bias")}

  def norm(prefix):
    return {"scale": get(f"{prefix}.weight"), "bias": get(f"{prefix}.bias")}

  prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
  params = {
      "word_embeddings": {"embedding": get(f"{prefix}embeddings.word_embeddings.weight")},
      "position_embeddings": {
          "embedding": get(f"{prefix}embeddings.position_embeddings.weight")},
      "token_type_embeddings": {
          "embedding": get(f"{prefix}embeddings.token_type_embeddings.weight")},
      "embeddings_norm": norm(f"{prefix}embeddings.LayerNorm"),
  }
  for i in range(config.num_layers):
    layer = f"{prefix}encoder.layer.{i}"
    params[f"layers_{i}"] = {
        "query": dense(f"{layer}.attention.self.query"),
        "key": dense(f"{layer}.attention.self.key"),
        "value": dense(f"{layer}.attention.self.value"),
        "attention_out": dense(f"{layer}.attention.output.dense"),
        "attention_norm": norm(f"{layer}.attention.output.LayerNorm"),
        "intermediate": dense(f"{layer}.intermediate.dense"),
        "output": dense(f"{layer}.output.dense"),
        "output_norm": norm(f"{layer}.output.LayerNorm"),
    }
  return params


def _settings_fingerprint(kind: str, weights_digest: str, settings: dict) -> str:
  payload = json.dumps({"kind": kind, "weights_sha256": weights_digest,
                        "settings": settings}, sort_keys=True)
  return hashlib.sha256(payload.encode("utf-8")).hexdigest()


_sha256_file = file_io.sha256_file


class MiniLMEmbedder:
  """all-MiniLM-L6-v2 (or any BERT folder in the same layout) in Flax, mean-pooled.

  Args:
    model_dir: a folder with `config.json`, `model.safetensors` and `tokenizer.json`.
    max_length: the default truncation length in tokens (library entries).
    batch_size: the largest batch per forward pass.
    precision: matrix product precision; HIGHEST keeps float32 on accelerators.
  """

  kind = "minilm"

  def __init__(self, model_dir: str | os.PathLike[str], *,
               max_length: int = LIBRARY_MAX_LENGTH, batch_size: int = 64,
               precision: Any = jax.lax.Precision.HIGHEST):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top

    self.model_dir = Path(model_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
      if not (self.model_dir / name).is_file():
        raise FileNotFoundError(
            f"{self.model_dir / name} not found; fetch the model with "
            "`elm-jax data fetch minilm` or pass a folder that has it.")
    self.config = BertConfig.from_hf_json(self.model_dir / "config.json")
    if not 2 <= max_length <= self.config.max_position_embeddings:
      raise ValueError(f"max_length {max_length} must be in [2, "
                       f"{self.config.max_position_embeddings}] for {self.model_dir}.")
    self.max_length = max_length
    self.batch_size = batch_size
    self.dim = self.config.hidden_size
    self._weights_sha256 = _sha256_file(self.model_dir / "model.safetensors")
    self.params = jax.tree.map(
        jnp.asarray,
        bert_params_from_hf(load_file(str(self.model_dir / "model.safetensors")),
                            self.config))
    self._tokenizer_json = (self.model_dir / "tokenizer.json").read_text(encoding="utf-8")
    self._tokenizer_cls = Tokenizer
    self._tokenizers: dict[int, Any] = {}
    module = BertEncoder(self.config, precision=precision)

    @jax.jit
    def forward(params, ids, mask):
      hidden = module.apply({"params": params}, ids, mask)
      return mean_pool_normalize(hidden, mask)

    self._forward = forward

  @property
  def fingerprint(self) -> str:
    return _settings_fingerprint(self.kind, self._weights_sha256, {
        "pooling": "mean", "normalize": "l2", "max_length": self.max_length,
        "tokenizer_sha256": hashlib.sha256(self._tokenizer_json.encode()).hexdigest()})

  def _tokenizer(self, max_length: int):
    if max_length not in self._tokenizers:
      tokenizer = self._tokenizer_cls.from_str(self._tokenizer_json)
      tokenizer.no_padding()
      tokenizer.enable_truncation(max_length=max_length)
      self._tokenizers[max_length] = tokenizer
    return self._tokenizers[max_length]

  def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return [e.ids for e in self._tokenizer(max_length).encode_batch(list(texts))]

  def embed(self, texts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
    max_length = max_length or self.max_length
    if max_length > self.config.max_position_embeddings:
      raise ValueError(f"max_length {max_length} exceeds the model's "
                       f"{self.config.max_position_embeddings} positions.")
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    ids = self.tokenize(texts, max_length)
    return run_bucketed(ids, batch_size=self.batch_size, buckets=length_buckets(max_length),
                        dim=self.dim,
                        forward=lambda i, m: self._forward(self.params, i, m))


def load_minilm(model_dir: str | os.PathLike[str] | None = None, **kwargs) -> MiniLMEmbedder:
  """Returns the MiniLM embedder from `model_dir`, else from the fetched `minilm` folder."""
  if model_dir is None:
    from elm_jax.data import fetch  # pylint: disable=g-import-not-at-top
    model_dir = fetch.ensure("minilm")
  return MiniLMEmbedder(model_dir, **kwargs)


# ---------------------------------------------------------------------- T5 encoder


def params_digest(params: Any) -> str:
  """sha256 over the sorted names, shapes, dtypes and bytes of a parameter tree."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  named = sorted((jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves)
  digest = hashlib.sha256()
  for name, value in named:
    digest.update(f"{name}|{value.shape}|{value.dtype}|".encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()


class T5MeanEmbedder:
  """A Sentence-T5-style embedder: the mean of a T5 encoder's outputs, L2-normalized.

  Args:
    model: a `elm_jax.models.t5.T5` module (only `encode` is called).
    params: its parameters (the `params` collection).
    vocabulary: a seqio vocabulary; EOS is appended as T5 inputs have it.
    max_length: the default truncation length in tokens, EOS included.
  """

  kind = "t5-mean"

  def __init__(self, *, model: nn.Module, params: Any, vocabulary: Any,
               max_length: int = LIBRARY_MAX_LENGTH, batch_size: int = 32):
    self.model = model
    self.params = params
    self.vocabulary = vocabulary
    self.max_length = max_length
    self.batch_size = batch_size
    self.dim = int(model.config.d_model)
    self._params_sha256 = params_digest(params)

    @jax.jit
    def forward(params, ids, mask):
      # The T5 encoder masks keys whose token is 0, so padding needs no extra mask.
      encoded = model.apply({"params": params}, ids, method="encode")
      return mean_pool_normalize(encoded.astype(jnp.float32), mask)

    self._forward = forward

  @property
  def fingerprint(self) -> str:
    sp_model = getattr(self.vocabulary, "sp_model", None)
    vocab_id = (hashlib.sha256(sp_model).hexdigest() if isinstance(sp_model, bytes)
                else f"{type(self.vocabulary).__name__}:{self.vocabulary.vocab_size}")
    return _settings_fingerprint(self.kind, self._params_sha256, {
        "pooling": "mean", "normalize": "l2", "max_length": self.max_length,
        "vocabulary": vocab_id})

  def tokenize(self, texts: Sequence[str], max_length: int) -> list[list[int]]:
    eos = self.vocabulary.eos_id
    return [list(self.vocabulary.encode(t))[:max_length - 1] + [eos] for t in texts]

  def embed(self, texts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
    max_length = max_length or self.max_length
    if not texts:
      return np.zeros((0, self.dim), np.float32)
    ids = self.tokenize(texts, max_length)
    return run_bucketed(ids, batch_size=self.batch_size, buckets=length_buckets(max_length),
                        dim=self.dim,
                        forward=lambda i, m: self._forward(self.params, i, m))


# ------------------------------------------------------------------ hashing (lexical)

_WORD = re.compile(r"\w+", re.UNICODE)


class HashingEmbedder:
  """A lexical baseline: hashed lowercase word unigrams and bigrams, L2-normalized.

  It needs no weights and no accelerator, so command-line tests and quick runs use
  it; it matches shared words, not meaning. Truncation counts words.
  """

  kind = "hashing"

  def __init__(self, dim: int = 384, *, max_length: int = LIBRARY_MAX_LENGTH):
    self.dim = dim
    self.max_length = max_length

  @property
  def fingerprint(self) -> str:
    return _settings_fingerprint(self.kind, "none", {
        "dim": self.dim, "hash": "crc32", "features": "unigram+bigram",
        "normalize": "l2", "max_length": self.max_length})

  def embed(self, texts: Sequence[str], *, max_length: int | None = None) -> np.ndarray:
    max_length = max_length or self.max_length
    out = np.zeros((len(texts), self.dim), np.float32)
    for row, text in enumerate(texts):
      words = _WORD.findall(text.lower())[:max_length]
      features = words + [a + " " + b for a, b in zip(words, words[1:])]
      for feature in features:
        out[row, zlib.crc32(feature.encode("utf-8")) % self.dim] += 1.0
      norm = np.linalg.norm(out[row])
      if norm > 0:
        out[row] /= norm
    return out


def build_embedder(kind: str, *, model_dir: str | os.PathLike[str] | None = None,
                   max_length: int = LIBRARY_MAX_LENGTH, dim: int = 384) -> Embedder:
  """Builds an embedder by kind name: `minilm` or `hashing`.

  `t5-mean` needs a model and parameters, so it is built with T5MeanEmbedder directly.
  """
  if kind == MiniLMEmbedder.kind:
    return load_minilm(model_dir, max_length=max_length)
  if kind == HashingEmbedder.kind:
    return HashingEmbedder(dim, max_length=max_length)
  raise ValueError(f"Unknown embedder kind {kind!r}; expected 'minilm' or 'hashing' "
                   "(build a 't5-mean' embedder with T5MeanEmbedder).")

