"""Tests of rank classification: the shared-encoder scorer and its predictions."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import t5

EOS = 1
CONFIG = t5.T5Config(vocab_size=53, d_model=24, d_kv=5, d_ff=30, num_heads=3,
                     num_encoder_layers=2, num_decoder_layers=3,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     dropout_rate=0.0)


def _init(config, seed=0):
  model = t5.T5(config)
  tokens = np.ones((1, 4), np.int32)
  variables = model.init(jax.random.PRNGKey(seed), tokens, tokens)
  return model, nn.unbox(variables)["params"]


def _randomize(params, seed):
  """Replaces every parameter with noise, so adapter `up` kernels are not zero."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  noisy = [0.3 * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noisy)


def pack(examples, *, batch_size, enc_len, dec_len, num_choices):
  """Packs (input ids, [choice ids], is_correct) triples in the scoring layout.

  Inputs and choices are given without EOS; EOS is appended here, as the Task
  and the converter do. Rows past the examples are padding (example_index -1).
  """
  batch = {
      "encoder_input_tokens": np.zeros((batch_size, enc_len), np.int32),
      "decoder_input_tokens": np.zeros((batch_size, dec_len), np.int32),
      "decoder_target_tokens": np.zeros((batch_size, dec_len), np.int32),
      "decoder_segment_ids": np.zeros((batch_size, dec_len), np.int32),
      "decoder_positions": np.zeros((batch_size, dec_len), np.int32),
      "choice_mask": np.zeros((batch_size, num_choices), bool),
      "is_correct": np.zeros((batch_size, num_choices), bool),
      "example_index": np.full((batch_size,), -1, np.int32),
  }
  for row, (inputs, choices, correct) in enumerate(examples):
    enc = list(inputs) + [EOS]
    batch["encoder_input_tokens"][row, :len(enc)] = enc
    offset = 0
    for c, choice in enumerate(choices):
      target = list(choice) + [EOS]
      shifted = [0] + target[:-1]
      span = slice(offset, offset + len(target))
      batch["decoder_target_tokens"][row, span] = target
      batch["decoder_input_tokens"][row, span] = shifted
      batch["decoder_segment_ids"][row, span] = c + 1
      batch["decoder_positions"][row, span] = np.arange(len(target))
      offset += len(target)
    batch["choice_mask"][row, :len(choices)] = True
    batch["is_correct"][row, :len(choices)] = correct
    batch["example_index"][row] = row
  return batch


def _random_examples(rng, counts, vocab=CONFIG.vocab_size):
  examples = []
  for num_choices in counts:
    inputs = rng.integers(2, vocab, size=rng.integers(3, 12))
    choices = [rng.integers(2, vocab, size=rng.integers(1, 6)) for _ in range(num_choices)]
    correct = np.zeros(num_choices, bool)
    correct[rng.integers(num_choices)] = True
    examples.append((inputs, choices, correct))
  return examples


@pytest.fixture(scope="module")
def tiny():
  model, params = _init(CONFIG)
  return model, _randomize(params, 1)


def test_shared_equals_naive_for_2_3_7_choices(tiny):
  model, params = tiny
  examples = _random_examples(np.random.default_rng(0), [2, 3, 7, 3])
  batch = pack(examples, batch_size=5, enc_len=16, dec_len=48, num_choices=8)
  shared_sums, shared_lengths = scorer_lib.ChoiceScorer(model).log_likelihoods(params, batch)
  naive_sums, naive_lengths = scorer_lib.naive_log_likelihoods(model, params, batch)
  mask = batch["choice_mask"]
  np.testing.assert_allclose(shared_sums[mask], naive_sums[mask], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(shared_lengths[mask], naive_lengths[mask])
  expected_lengths = [len(c) + 1 for _, choices, _ in examples for c in choices]
  assert shared_lengths[mask].tolist() == expected_lengths


def test_shared_equals_naive_with_adapters():
  config = dataclasses.replace(CONFIG, adapter=t5.AdapterConfig(reduction_factor=4))
  model, params = _init(config)
  params = _randomize(params, 2)
  examples = _random_examples(np.random.default_rng(1), [4, 2])
  batch = pack(examples, batch_size=2, enc_len=16, dec_len=32, num_choices=4)
  shared, _ = scorer_lib.ChoiceScorer(model).log_likelihoods(params, batch)
  naive, _ = scorer_lib.naive_log_likelihoods(model, params, batch)
  mask = batch["choice_mask"]
  np.testing.assert_allclose(shared[mask], naive[mask], atol=1e-5, rtol=0)


def test_choice_packing_does_not_leak_between_choices(tiny):
  """A choice's score must not depend on the other choices in its row."""
  model, params = tiny
  inputs = np.array([5, 6, 7, 8])
  a, b, c = np.array([9, 10]), np.array([11, 12, 13]), np.array([14])
  together = pack([(inputs, [a, b, c], [True, False, False])], batch_size=1, enc_len=8,
                  dec_len=16, num_choices=4)
  alone = pack([(inputs, [b], [True])], batch_size=1, enc_len=8, dec_len=16, num_choices=4)
  scorer = scorer_lib.ChoiceScorer(model)
  sums_together, _ = scorer.log_likelihoods(params, together)
  sums_alone, _ = scorer.log_likelihoods(params, alone)
  np.testing.assert_allclose(sums_together[0, 1], sums_alone[0, 0], atol=1e-5)


def test_normalizations(tiny):
  model, params = tiny
  batch = pack(_random_examples(np.random.default_rng(2), [3, 5]), batch_size=2,
               enc_len=16, dec_len=32, num_choices=5)
  sums, lengths = scorer_lib.ChoiceScorer(model).log_likelihoods(params, batch)
  mask = batch["choice_mask"]
  mean = scorer_lib.ChoiceScorer(
      model, scoring=scorer_lib.ScoringConfig(normalization="mean"))(params, batch)
  np.testing.assert_allclose(mean[mask], sums[mask] / lengths[mask], rtol=1e-6)
  half = scorer_lib.ChoiceScorer(model, scoring=scorer_lib.ScoringConfig(
      normalization="length_penalty", length_penalty_alpha=0.5))(params, batch)
  np.testing.assert_allclose(half[mask], sums[mask] / np.sqrt(lengths[mask]), rtol=1e-6)
  assert np.all(np.isneginf(mean[~mask]))


def test_invalid_normalization_is_rejected():
  with pytest.raises(ValueError, match="normalization='max'"):
    scorer_lib.ScoringConfig(normalization="max")


def test_no_recompilation_within_a_bucket(tiny):
  model, params = tiny
  rng = np.random.default_rng(3)
  scorer = scorer_lib.ChoiceScorer(model)
  for counts in ([2, 3], [4, 1], [3]):
    batch = pack(_random_examples(rng, counts), batch_size=2, enc_len=16, dec_len=32,
                 num_choices=4)
    scorer(params, batch)
  assert scorer.trace_count == 1
  # Another expert's parameters on the same model definition reuse the trace.
  scorer(_randomize(params, 7), batch)
  assert scorer.trace_count == 1
  bigger = pack(_random_examples(rng, [2]), batch_size=2, enc_len=32, dec_len=32,
                num_choices=4)
  scorer(params, bigger)
  assert scorer.trace_count == 2


def test_predict_ties_go_to_lowest_index():
  scores = np.array([[-1.0, -0.5, -0.5, -3.0], [-2.0, -2.0, 5.0, -1.0]])
  mask = np.array([[True, True, True, True], [True, True, False, True]])
  assert scorer_lib.predict(scores, mask).tolist() == [1, 3]


def test_identical_choices_tie_to_first(tiny):
  model, params = tiny
  choice = np.array([9, 10, 11])
  batch = pack([(np.array([4, 5, 6]), [choice, choice.copy()], [False, True])],
               batch_size=1, enc_len=8, dec_len=16, num_choices=2)
  records = scorer_lib.score_batches([batch], scorer=scorer_lib.ChoiceScorer(model),
                                     params=params, task_name="t")
  assert records[0]["scores"][0] == records[0]["scores"][1]
  assert records[0]["prediction"] == 0
  assert records[0]["is_correct"] is False


def test_several_correct_choices(tiny):
  model, params = tiny
  scorer = scorer_lib.ChoiceScorer(model)
  examples = _random_examples(np.random.default_rng(4), [3])
  batch = pack(examples, batch_size=1, enc_len=16, dec_len=32, num_choices=3)
  predicted = scorer_lib.predict(scorer(params, batch), batch["choice_mask"])[0]
  others = [c for c in range(3) if c != predicted]
  # Mark the predicted choice and one other correct: the example is correct.
  correct = np.zeros(3, bool)
  correct[[predicted, others[0]]] = True
  batch["is_correct"][0] = correct
  record, = scorer_lib.score_batches([batch], scorer=scorer, params=params, task_name="t")
  assert record["correct_choices"] == sorted([int(predicted), others[0]])
  assert record["is_correct"] is True
  # Only the two others correct: wrong.
  batch["is_correct"][0] = ~correct | (np.arange(3) == others[0])
  batch["is_correct"][0, predicted] = False
  record, = scorer_lib.score_batches([batch], scorer=scorer, params=params, task_name="t")
  assert record["is_correct"] is False


def test_padding_rows_produce_no_records(tiny):
  model, params = tiny
  batch = pack(_random_examples(np.random.default_rng(5), [2, 2]), batch_size=4,
               enc_len=16, dec_len=16, num_choices=2)
  records = scorer_lib.score_batches([batch], scorer=scorer_lib.ChoiceScorer(model),
                                     params=params, task_name="t")
  assert [r["idx"] for r in records] == [0, 1]


def test_empty_choices_error_names_task_and_example():
  example = {"idx": 17, "answer_choices": [], "is_correct": []}
  with pytest.raises(scorer_lib.ScoringError, match=r"'my_task'.*idx=17"):
    scorer_lib.check_choices(example, task_name="my_task", position=3)


def test_is_correct_length_mismatch_is_an_error():
  example = {"idx": 2, "answer_choices": ["a", "b"], "is_correct": [True]}
  with pytest.raises(scorer_lib.ScoringError, match="is_correct has shape"):
    scorer_lib.check_choices(example, task_name="t", position=0)


def test_log_likelihoods_match_transformers(tmp_path):
  """Weights imported from a random Hugging Face T5 score as PyTorch scores them."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from elm_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top

  hf_config = transformers.T5Config(**hf.config_to_hf(CONFIG))
  torch.manual_seed(0)
  torch_model = transformers.T5ForConditionalGeneration(hf_config).eval()
  torch_model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  config, params = hf.load_hf(tmp_path / "hf")
  model = t5.T5(config)

  examples = _random_examples(np.random.default_rng(6), [2, 5, 3])
  batch = pack(examples, batch_size=3, enc_len=16, dec_len=32, num_choices=5)
  sums, _ = scorer_lib.ChoiceScorer(model).log_likelihoods(params, batch)

  for row, (inputs, choices, _) in enumerate(examples):
    input_ids = torch.tensor([list(inputs) + [EOS]])
    for c, choice in enumerate(choices):
      labels = torch.tensor([list(choice) + [EOS]])
      with torch.no_grad():
        logits = torch_model(input_ids=input_ids, labels=labels).logits
      log_probs = torch.log_softmax(logits.double(), dim=-1)
      expected = log_probs[0].gather(-1, labels[0][:, None]).sum().item()
      assert abs(sums[row, c] - expected) < 1e-4, (row, c, sums[row, c], expected)
