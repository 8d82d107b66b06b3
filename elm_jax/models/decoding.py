"""Greedy decoding and beam search for elm-jax's T5, over the key/value cache.

Both run as one jitted `lax.while_loop` per call shape: the encoder runs once,
the decoder cache is created for `max_decode_length` positions (see
`elm_jax.models.t5`), and each iteration feeds one token per row. Decoding
starts from token 0 (T5's decoder start token) and stops at `eos_id`.

Output tokens exclude the start token, are `max_decode_length` long, and are 0
after the first EOS. They match Hugging Face transformers 4.57's `generate`:
greedy with `do_sample=False, num_beams=1`, and beam search with `num_beams=k,
do_sample=False` and the same `length_penalty` and `early_stopping` (there the
length of a finished hypothesis counts its generated tokens, EOS included).
"""

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from elm_jax.models import t5

Array = jax.Array
Params = Mapping[str, Any]

DECODER_START_ID = 0
EOS_ID = 1
# Score of impossible or not-yet-set beams (Hugging Face uses the same constant).
_NEG = -1.0e9


def _encode_and_init_cache(model: t5.T5, params: Params, encoder_input_tokens: Array,
                           max_decode_length: int) -> tuple[Array, Any]:
  encoded = model.apply({"params": params}, encoder_input_tokens, method=t5.T5.encode)
  batch = encoder_input_tokens.shape[0]
  _, state = model.apply(
      {"params": params}, encoded, encoder_input_tokens,
      jnp.zeros((batch, max_decode_length), jnp.int32), decode=True, mutable=["cache"],
      method=t5.T5.decode)
  return encoded, state["cache"]


def _decode_step(model: t5.T5, params: Params, cache: Any, encoded: Array,
                 encoder_input_tokens: Array, tokens: Array) -> tuple[Array, Any]:
  """Feeds `tokens` `[rows]` and returns log-probabilities `[rows, vocab]` and the cache."""
  logits, state = model.apply(
      {"params": params, "cache": cache}, encoded, encoder_input_tokens, tokens[:, None],
      decode=True, mutable=["cache"], method=t5.T5.decode)
  return jax.nn.log_softmax(logits[:, 0].astype(jnp.float32), axis=-1), state["cache"]


def _gather_cache_rows(cache: Any, rows: Array) -> Any:
  """Reorders the batch axis (axis 0) of every cache array except `cache_index`."""
  def gather(path, leaf):
    if getattr(path[-1], "key", None) == "cache_index":
      return leaf
    return jnp.take(leaf, rows, axis=0)
  return jax.tree_util.tree_map_with_path(gather, cache)


def greedy_decode(params: Params, encoder_input_tokens: Array, *, config: t5.T5Config,
                  max_decode_length: int, eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Decodes the most likely token at every step.

  Args:
    params: the model parameters.
    encoder_input_tokens: int32 `[batch, enc_len]`, 0-padded.
    config: the model config.
    max_decode_length: the maximum number of generated tokens, EOS included.
    eos_id: the token that ends a sequence.

  Returns:
    tokens: int32 `[batch, max_decode_length]`, 0 after EOS.
    scores: float32 `[batch]`, the sum of the log-probabilities of the tokens up to
      and including EOS.
  """
  return _greedy(params, jnp.asarray(encoder_input_tokens, jnp.int32), config=config,
                 max_decode_length=max_decode_length, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("config", "max_decode_length", "eos_id"))
def _greedy(params, encoder_input_tokens, *, config, max_decode_length, eos_id):
  model = t5.T5(config)
  batch = encoder_input_tokens.shape[0]
  encoded, cache = _encode_and_init_cache(model, params, encoder_input_tokens,
                                          max_decode_length)

  def cond(state):
    step, _, _, finished, _, _ = state
    return (step < max_decode_length) & ~jnp.all(finished)

  def body(state):
    step, previous, tokens, finished, scores, cache = state
    log_probs, cache = _decode_step(model, params, cache, encoded, encoder_input_tokens,
                                    previous)
    chosen = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [batch]
    chosen_log_prob = jnp.take_along_axis(log_probs, chosen[:, None], axis=-1)[:, 0]
    # Finished rows emit padding, as Hugging Face's greedy search does.
    chosen = jnp.where(finished, 0, chosen)
    scores = scores + jnp.where(finished, 0.0, chosen_log_prob)
    tokens = tokens.at[:, step].set(chosen)
    finished = finished | (chosen == eos_id)
    return step + 1, chosen, tokens, finished, scores, cache

  state = (jnp.array(0, jnp.int32), jnp.full((batch,), DECODER_START_ID, jnp.int32),
           jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32), cache)
  _, _, tokens, _, scores, _ = jax.lax.while_loop(cond, body, state)
  return tokens, scores


def beam_search(params: Params, encoder_input_tokens: Array, *, config: t5.T5Config,
                num_beams: int, max_decode_length: int, length_penalty: float = 1.0,
                early_stopping: bool | str = True,
                eos_id: int = EOS_ID) -> tuple[Array, Array]:
  """Beam search with Hugging Face's hypothesis scoring and stopping rules.

  At each step the 2 * num_beams best continuations of all beams (by summed
  log-probability) are taken. Those among the first num_beams that end in EOS,
  or reach `max_decode_length`, become finished hypotheses scored
  `sum_log_prob / generated_length ** length_penalty`. The num_beams best
  continuations that do not end become the running beams. With
  `early_stopping=True` a row is done once num_beams hypotheses have finished.
  With False or "never" it is done when no running beam can beat the worst
  finished hypothesis, by transformers' estimate.

  Args:
    params: the model parameters.
    encoder_input_tokens: int32 `[batch, enc_len]`, 0-padded.
    config: the model config.
    num_beams: beams per example; `2 * num_beams` must not exceed the vocabulary.
    max_decode_length: the maximum number of generated tokens, EOS included.
    length_penalty: exponent of the length normalization.
    early_stopping: True, False or "never", as in transformers' `generate`.
    eos_id: the token that ends a sequence.

  Returns:
    tokens: int32 `[batch, num_beams, max_decode_length]`, best first, 0 after EOS.
    scores: float32 `[batch, num_beams]`, the length-normalized scores.
  """
  if early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping={early_stopping!r} is invalid; use True, False or "
                     "'never'.")
  if 2 * num_beams > config.vocab_size:
    raise ValueError(f"num_beams={num_beams} needs a vocabulary of at least "
                     f"{2 * num_beams} tokens; the model has {config.vocab_size}.")
  return _beam(params, jnp.asarray(encoder_input_tokens, jnp.int32), config=config,
               num_beams=num_beams, max_decode_length=max_decode_length,
               length_penalty=float(length_penalty), early_stopping=early_stopping,
               eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=(
    "config", "num_beams", "max_decode_length", "length_penalty", "early_stopping",
    "eos_id"))
def _beam(params, encoder_input_tokens, *, config, num_beams, max_decode_length,
          length_penalty, early_stopping, eos_id):
  model = t5.T5(config)
  batch, k, length, vocab = (encoder_input_tokens.shape[0], num_beams, max_decode_length,
                             config.vocab_size)
  candidates = 2 * k
  # Each example appears k times in a row: flat row b * k + j is beam j of example b.
  flat_inputs = jnp.repeat(encoder_input_tokens, k, axis=0)
  encoded, cache = _encode_and_init_cache(model, params, flat_inputs, length)
  is_top_k = jnp.arange(candidates) < k  # [2k]

  def gather_beams(x, indices):
    """x `[batch, n, ...]`, indices `[batch, m]` -> `[batch, m, ...]`."""
    return jax.vmap(lambda xb, ib: jnp.take(xb, ib, axis=0))(x, indices)

  def body(state):
    (step, running, running_scores, finished, finished_scores, is_finished,
     improvable, _, cache) = state

    # a. Log-probabilities of every continuation of every running beam.
    previous = jnp.where(step == 0, DECODER_START_ID,
                         jnp.take(running, jnp.maximum(step - 1, 0), axis=2))  # [batch, k]
    log_probs, cache = _decode_step(model, params, cache, encoded, flat_inputs,
                                    previous.reshape(-1))
    totals = log_probs.reshape(batch, k, vocab) + running_scores[:, :, None]
    top_scores, top_indices = jax.lax.top_k(totals.reshape(batch, k * vocab), candidates)
    origin = top_indices // vocab  # [batch, 2k] beam each candidate extends
    token = (top_indices % vocab).astype(jnp.int32)
    top_seqs = gather_beams(running, origin).at[:, :, step].set(token)  # [batch, 2k, len]
    ends = (token == eos_id) | (step + 1 >= length)  # [batch, 2k]

    # b. The k best candidates that go on become the running beams.
    _, keep = jax.lax.top_k(top_scores + ends * _NEG, k)  # [batch, k]
    running = gather_beams(top_seqs, keep)
    running_scores = gather_beams(top_scores + ends * _NEG, keep)
    rows = (jnp.arange(batch)[:, None] * k + gather_beams(origin, keep)).reshape(-1)
    cache = _gather_cache_rows(cache, rows)

    # c. Candidates among the first k that end join the finished hypotheses.
    normalized = top_scores / ((step + 1).astype(jnp.float32) ** length_penalty)
    if early_stopping is True:
      normalized = normalized + jnp.all(is_finished, axis=-1, keepdims=True) * _NEG
    normalized = normalized + (~improvable) * _NEG
    normalized = normalized + (~(ends & is_top_k[None])) * _NEG
    merged_scores = jnp.concatenate([finished_scores, normalized], axis=1)
    _, best = jax.lax.top_k(merged_scores, k)
    finished = gather_beams(jnp.concatenate([finished, top_seqs], axis=1), best)
    finished_scores = gather_beams(merged_scores, best)
    is_finished = gather_beams(
        jnp.concatenate([is_finished, ends & is_top_k[None]], axis=1), best)

    # d. Could a running beam still beat the worst finished hypothesis?
    if early_stopping == "never" and length_penalty > 0.0:
      best_length = float(length)
    else:
      best_length = (step + 1).astype(jnp.float32)
    best_running = running_scores[:, :1] / best_length ** length_penalty
    worst_finished = jnp.where(is_finished, jnp.min(finished_scores, axis=1, keepdims=True),
                               _NEG)
    improvable = improvable & jnp.any(best_running > worst_finished, axis=-1,
                                      keepdims=True)
    go_on = (jnp.any(improvable)
             & ~(jnp.all(is_finished) & (early_stopping is True))
             & ~jnp.all(ends))
    return (step + 1, running, running_scores, finished, finished_scores, is_finished,
            improvable, go_on, cache)

  state = (
      jnp.array(0, jnp.int32),
      jnp.zeros((batch, k, length), jnp.int32),
      # Only the first beam is live at the start, so the k beams do not repeat it.
      jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, _NEG)[None], (batch, 1)),
      jnp.zeros((batch, k, length), jnp.int32),
      jnp.full((batch, k), _NEG, jnp.float32),
      jnp.zeros((batch, k), bool),
      jnp.ones((batch, 1), bool),
      jnp.array(True),
      cache,
  )
  state = jax.lax.while_loop(lambda s: s[7], body, state)
  finished, finished_scores = state[3], state[4]
  # Zero everything after the first EOS (positions never written are already 0).
  after_eos = jnp.cumsum(finished == eos_id, axis=-1) - (finished == eos_id) > 0
  return jnp.where(after_eos, 0, finished), finished_scores
