"""Tests of elm_jax.data.vocab: the offline default vocabulary and its checks."""

import json

import pytest

from data_fixtures import SMALL_VOCAB_SIZE, SMALL_VOCAB_TASKS, build_small_vocab, linked_cache, make_linked_cache, small_vocab  # pylint: disable=unused-import
from elm_jax.data import bigbench
from elm_jax.data import fetch
from elm_jax.data import vocab as vocab_lib


def test_build_is_deterministic(small_vocab, linked_cache, tmp_path):
  other = make_linked_cache(tmp_path / "other")
  again = build_small_vocab(other)
  first = vocab_lib.default_vocabulary_path(linked_cache, SMALL_VOCAB_SIZE)
  assert again.read_bytes() == first.read_bytes()


def test_special_ids_follow_t5(small_vocab):
  assert small_vocab.pad_id == 0
  assert small_vocab.eos_id == 1
  assert small_vocab.unk_id == 2
  assert small_vocab.tokenizer.bos_id() == -1
  assert small_vocab.tokenizer.id_to_piece(0) == "<pad>"
  assert small_vocab.tokenizer.id_to_piece(1) == "</s>"


def test_vocab_size_counts_extra_ids(small_vocab):
  assert small_vocab.vocab_size == SMALL_VOCAB_SIZE + 100
  assert small_vocab.extra_ids == 100


def test_extra_ids_decode_as_sentinels(small_vocab):
  last = small_vocab.vocab_size - 1
  assert small_vocab.decode([last]) == "<extra_id_0>"
  assert small_vocab.decode([last - 99]) == "<extra_id_99>"
  encoded = small_vocab.encode("the date")
  assert max(encoded) < SMALL_VOCAB_SIZE


def test_text_round_trips(small_vocab):
  text = "Which of the following is an anachronism?"
  assert small_vocab.decode(small_vocab.encode(text)) == text


def test_sidecar_records_sha_and_settings(small_vocab, linked_cache):
  path = vocab_lib.default_vocabulary_path(linked_cache, SMALL_VOCAB_SIZE)
  info = json.loads(path.with_suffix(".json").read_text())
  assert info["sha256"] == fetch.sha256_file(path)
  assert info["settings"]["task_names"] == sorted(SMALL_VOCAB_TASKS)
  assert info["settings"]["vocab_size"] == SMALL_VOCAB_SIZE


def test_missing_default_names_build_command(tmp_path):
  with pytest.raises(fetch.MissingDataError, match="elm-jax data build-vocab"):
    vocab_lib.get_vocabulary(cache=tmp_path)


def test_lazy_default_fails_at_first_use(tmp_path):
  lazy = vocab_lib.get_vocabulary(cache=tmp_path, check_exists=False)
  with pytest.raises(fetch.MissingDataError, match="elm-jax data build-vocab"):
    lazy.encode("hello")


def test_modified_model_fails_checksum(small_vocab, linked_cache, tmp_path):
  cache = make_linked_cache(tmp_path / "copy")
  source = vocab_lib.default_vocabulary_path(linked_cache, SMALL_VOCAB_SIZE)
  target = vocab_lib.default_vocabulary_path(cache, SMALL_VOCAB_SIZE)
  target.parent.mkdir(parents=True)
  target.write_bytes(source.read_bytes() + b"x")
  target.with_suffix(".json").write_bytes(source.with_suffix(".json").read_bytes())
  with pytest.raises(fetch.ChecksumError, match="build-vocab"):
    vocab_lib.get_vocabulary(cache=cache, vocab_size=SMALL_VOCAB_SIZE)


def test_explicit_path_loads_any_model(small_vocab, linked_cache):
  path = vocab_lib.default_vocabulary_path(linked_cache, SMALL_VOCAB_SIZE)
  vocab = vocab_lib.get_vocabulary(str(path), extra_ids=7)
  assert vocab.vocab_size == SMALL_VOCAB_SIZE + 7


def test_missing_explicit_path_raises(tmp_path):
  with pytest.raises(fetch.MissingDataError, match="nope.model"):
    vocab_lib.get_vocabulary(str(tmp_path / "nope.model"))


def test_check_vocab_matches_accepts_padded(small_vocab):
  vocab_lib.check_vocab_matches(small_vocab, vocab_lib.padded_vocab_size(small_vocab))
  vocab_lib.check_vocab_matches(small_vocab, small_vocab.vocab_size)


def test_check_vocab_matches_rejects_smaller(small_vocab):
  with pytest.raises(ValueError, match="at least 497"):
    vocab_lib.check_vocab_matches(small_vocab, small_vocab.vocab_size - 1)


def test_padded_size_is_multiple_of_128(small_vocab):
  assert vocab_lib.padded_vocab_size(small_vocab) == 512


def test_eval_tasks_rejected_as_training_text(linked_cache):
  with pytest.raises(ValueError, match="evaluation tasks"):
    list(bigbench.held_in_text(cache=linked_cache, task_names=["strategyqa"]))
