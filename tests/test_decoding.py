"""Greedy decoding and beam search against transformers 4.57's `generate`."""

import jax
import numpy as np
import pytest
import torch
import transformers

from elm_jax.checkpoints import hf
from elm_jax.models import decoding
from elm_jax.models import t5

transformers.logging.set_verbosity_error()

HF_CONFIGS = {
    "v1_0": dict(vocab_size=29, d_model=20, d_kv=7, d_ff=26, num_heads=3, num_layers=2,
                 num_decoder_layers=3, relative_attention_num_buckets=10,
                 relative_attention_max_distance=20, feed_forward_proj="relu",
                 tie_word_embeddings=True),
    "v1_1": dict(vocab_size=31, d_model=24, d_kv=5, d_ff=30, num_heads=4, num_layers=3,
                 num_decoder_layers=2, relative_attention_num_buckets=12,
                 relative_attention_max_distance=40, feed_forward_proj="gated-gelu",
                 tie_word_embeddings=False),
}
# Factor on the EOS row of the output projection per config, chosen so that some
# but not all sequences end before MAX_DECODE_LENGTH.
EOS_ROW_SCALE = {"v1_0": -1.0, "v1_1": 4.0}
MAX_DECODE_LENGTH = 10
EOS = 1


def make_prompts(vocab_size: int) -> np.ndarray:
  rng = np.random.default_rng(1)
  prompts = rng.integers(2, vocab_size, size=(6, 9))
  prompts[1, 5:] = 0
  prompts[3, 3:] = 0
  prompts[4, 7:] = 0
  return prompts


def build_models(kind: str, directory):
  """(HF model, elm-jax config, params, prompts) with the same random weights.

  Weights get std 0.3 and the EOS output row is rescaled, so that some sequences
  end early and beam search differs from greedy decoding.
  """
  torch.manual_seed(0)
  hf_config = transformers.T5Config(decoder_start_token_id=0, **HF_CONFIGS[kind])
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layer_norm" not in name:
        param.normal_(0.0, 0.3)
    model.get_output_embeddings().weight[EOS] *= EOS_ROW_SCALE[kind]
  model.save_pretrained(directory)
  config, params = hf.load_hf(directory)
  return model, config, params, make_prompts(hf_config.vocab_size)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
  built = {}

  def get(kind):
    if kind not in built:
      built[kind] = build_models(kind, tmp_path_factory.mktemp(kind))
    return built[kind]

  return get


@pytest.fixture(params=sorted(HF_CONFIGS))
def models(request, build):
  return build(request.param)


@pytest.fixture
def untied(build):
  """The T5 v1.1 models alone, for variants that need not run twice."""
  return build("v1_1")


def hf_generate(model, prompts, **kwargs):
  # use_cache=False: transformers 4.57.6 sizes its decoder cache by the encoder depth
  # and fails when the decoder is deeper; without the cache the result is the same.
  with torch.no_grad():
    return model.generate(
        input_ids=torch.tensor(prompts), attention_mask=torch.tensor(prompts > 0),
        do_sample=False, max_new_tokens=MAX_DECODE_LENGTH, use_cache=False,
        return_dict_in_generate=True, output_scores=True, **kwargs)


def until_eos(tokens) -> list[int]:
  tokens = [int(t) for t in tokens]
  return tokens[:tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_greedy_matches_transformers(models):
  model, config, params, prompts = models
  expected = hf_generate(model, prompts, num_beams=1).sequences.numpy()[:, 1:]
  expected = np.pad(expected, ((0, 0), (0, MAX_DECODE_LENGTH - expected.shape[1])))
  tokens, _ = decoding.greedy_decode(params, prompts, config=config,
                                     max_decode_length=MAX_DECODE_LENGTH)
  np.testing.assert_array_equal(np.asarray(tokens), expected)


def test_greedy_fixture_ends_some_rows_early(models):
  model, _, _, prompts = models
  sequences = hf_generate(model, prompts, num_beams=1).sequences.numpy()[:, 1:]
  assert any(EOS in row[:-1] for row in sequences)


def test_greedy_scores_are_sequence_log_probs(models):
  model, config, params, prompts = models
  tokens, scores = decoding.greedy_decode(params, prompts, config=config,
                                          max_decode_length=MAX_DECODE_LENGTH)
  tokens = np.asarray(tokens)
  dec = np.concatenate([np.zeros((len(tokens), 1), np.int32), tokens[:, :-1]], axis=1)
  logits = jax.jit(t5.T5(config).apply)({"params": params}, prompts, dec, tokens)
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  picked = np.take_along_axis(log_probs, tokens[:, :, None], axis=-1)[:, :, 0]
  expected = np.where(tokens > 0, picked, 0.0).sum(axis=1)
  np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-4)


def check_beam_search(models, num_beams, length_penalty, early_stopping):
  model, config, params, prompts = models
  reference = hf_generate(model, prompts, num_beams=num_beams,
                          length_penalty=length_penalty, early_stopping=early_stopping)
  tokens, scores = decoding.beam_search(
      params, prompts, config=config, num_beams=num_beams,
      max_decode_length=MAX_DECODE_LENGTH, length_penalty=length_penalty,
      early_stopping=early_stopping)
  tokens, scores = np.asarray(tokens), np.asarray(scores)
  for row in range(len(prompts)):
    assert until_eos(tokens[row, 0]) == until_eos(reference.sequences[row, 1:]), row
  np.testing.assert_allclose(scores[:, 0], reference.sequences_scores.numpy(), atol=1e-4)


def test_beam_search_matches_transformers(models):
  check_beam_search(models, num_beams=3, length_penalty=1.0, early_stopping=True)


def test_beam_search_length_penalty_no_early_stop(untied):
  check_beam_search(untied, num_beams=4, length_penalty=0.6, early_stopping=False)


def test_beam_search_differs_from_greedy(models):
  """Guards the fixture: with identical results the beam test would prove little."""
  _, config, params, prompts = models
  greedy, _ = decoding.greedy_decode(params, prompts, config=config,
                                     max_decode_length=MAX_DECODE_LENGTH)
  beams, _ = decoding.beam_search(params, prompts, config=config, num_beams=3,
                                  max_decode_length=MAX_DECODE_LENGTH)
  assert not np.array_equal(np.asarray(greedy), np.asarray(beams)[:, 0])


def test_beam_tokens_are_zero_after_eos(models):
  _, config, params, prompts = models
  tokens, _ = decoding.beam_search(params, prompts, config=config, num_beams=3,
                                   max_decode_length=MAX_DECODE_LENGTH)
  for sequence in np.asarray(tokens).reshape(-1, MAX_DECODE_LENGTH):
    ended = until_eos(sequence)
    assert not np.any(sequence[len(ended):]), sequence


def test_scanned_model_decodes_the_same(untied):
  _, config, params, prompts = untied
  scanned = t5.T5Config(**{**config.__dict__, "scan_layers": True})
  stacked = t5.stack_layers(params)
  unscanned_tokens, _ = decoding.beam_search(params, prompts, config=config, num_beams=3,
                                             max_decode_length=MAX_DECODE_LENGTH)
  scanned_tokens, _ = decoding.beam_search(stacked, prompts, config=scanned, num_beams=3,
                                           max_decode_length=MAX_DECODE_LENGTH)
  np.testing.assert_array_equal(np.asarray(scanned_tokens), np.asarray(unscanned_tokens))


def test_beam_search_rejects_too_many_beams(models):
  _, config, params, prompts = models
  with pytest.raises(ValueError, match="num_beams"):
    decoding.beam_search(params, prompts, config=config, num_beams=config.vocab_size,
                         max_decode_length=4)
