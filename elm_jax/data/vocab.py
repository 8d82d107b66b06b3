"""SentencePiece vocabularies: T5's model from a path, or an offline default.

No T5 SentencePiece model ships in any installable package, so offline runs use
a default vocabulary trained here. It is a SentencePiece unigram model over the
training split of the held-in BIG-bench tasks (never the 13 evaluation tasks),
with T5's special ids (pad 0, eos 1, unk 2, no bos) and NFKC normalization.
seqio appends the 100 sentinel ids `<extra_id_0..99>` at the end, so
`<extra_id_0>` is `vocab_size - 1`.

Training is deterministic: a fixed sample of examples per task in sorted task
order (`elm_jax.data.bigbench.held_in_text`), split into lines, no input
shuffling and one thread, so two builds from the same BIG-bench files give
byte-identical model files. `build_default_vocabulary` writes
`<cache>/vocab/bigbench_unigram_<size>.model` and a JSON sidecar with its
sha256 and the training settings, each by an atomic rename.
"""

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import seqio
import sentencepiece as spm
import tensorflow as tf

from elm_jax import file_io
from elm_jax.data import bigbench
from elm_jax.data import fetch

DEFAULT_VOCAB_SIZE = 8000
DEFAULT_EXTRA_IDS = 100
# T5 pads the embedding table up to a multiple of 128 rows.
VOCAB_PAD_MULTIPLE = 128


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
  """Training data and options of the default vocabulary, recorded in its sidecar."""
  vocab_size: int = DEFAULT_VOCAB_SIZE
  examples_per_task: int = 200
  max_line_chars: int = 1000
  character_coverage: float = 0.9995
  model_type: str = "unigram"
  task_names: tuple[str, ...] | None = None  # None: every held-in task file


def default_vocabulary_path(cache: str | os.PathLike[str] | None = None,
                            vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
  return fetch.cache_root(cache) / "vocab" / f"bigbench_unigram_{vocab_size}.model"


def _sidecar(model_path: Path) -> Path:
  return model_path.with_suffix(".json")


def _training_lines(settings: TrainingSettings,
                    cache: str | os.PathLike[str] | None) -> Iterator[str]:
  for text in bigbench.held_in_text(cache=cache, examples_per_task=settings.examples_per_task,
                                    max_chars=1 << 30, task_names=settings.task_names):
    for line in text.splitlines():
      line = line.strip()
      if line:
        yield line[:settings.max_line_chars]


def build_default_vocabulary(cache: str | os.PathLike[str] | None = None,
                             vocab_size: int = DEFAULT_VOCAB_SIZE, *,
                             examples_per_task: int = TrainingSettings.examples_per_task,
                             task_names: Sequence[str] | None = None,
                             overwrite: bool = False) -> Path:
  """Trains the default SentencePiece model and returns its path.

  Args:
    cache: the cache root holding the fetched bigbench artifact; the model is
      written under it.
    vocab_size: SentencePiece pieces, special pieces included and the 100
      sentinels excluded.
    examples_per_task: training examples read per held-in task file.
    task_names: the held-in task files to read (sanitized names); None reads
      all of them. Tests use a few small files to build quickly.
    overwrite: retrain even when the model file exists already.

  Raises:
    MissingDataError: bigbench was never fetched into `cache`.
  """
  settings = TrainingSettings(
      vocab_size=vocab_size, examples_per_task=examples_per_task,
      task_names=None if task_names is None else tuple(sorted(task_names)))
  target = default_vocabulary_path(cache, vocab_size)
  if target.is_file() and _sidecar(target).is_file() and not overwrite:
    logging.info("Vocabulary %s exists already.", target)
    return target

  start = time.perf_counter()
  lines = list(_training_lines(settings, cache))
  logging.info("Training a %d-piece SentencePiece %s model on %d lines of held-in "
               "BIG-bench text.", vocab_size, settings.model_type, len(lines))
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model,
      model_type=settings.model_type, vocab_size=vocab_size,
      character_coverage=settings.character_coverage,
      normalization_rule_name="nmt_nfkc",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      input_sentence_size=0, shuffle_input_sentence=False,
      max_sentence_length=4 * settings.max_line_chars,
      num_threads=1, minloglevel=2)
  seconds = time.perf_counter() - start
  data = model.getvalue()

  info = {
      "sha256": hashlib.sha256(data).hexdigest(),
      "settings": dataclasses.asdict(settings),
      "training_lines": len(lines),
      "bigbench_index": bigbench.index_path(cache).name,
      "train_seconds": round(seconds, 1),
  }
  # The model first, then the sidecar: a model without a sidecar is rebuilt.
  file_io.write_bytes_atomic(target, data)
  file_io.write_bytes_atomic(_sidecar(target), json.dumps(info, indent=1).encode("utf-8"))
  logging.info("Wrote %s (%d bytes, sha256 %s) in %.1f s.", target, len(data),
               info["sha256"], seconds)
  return target


def verify_default_vocabulary(model_path: Path) -> None:
  """Checks a default model file against the sha256 in its sidecar.

  Raises:
    MissingDataError: the model or its sidecar is missing.
    ChecksumError: the model file changed since it was built.
  """
  sidecar = _sidecar(model_path)
  if not model_path.is_file() or not sidecar.is_file():
    raise fetch.MissingDataError(
        f"Default vocabulary {model_path} not found. Run `elm-jax data build-vocab "
        f"--vocab-size {model_path.stem.rsplit('_', 1)[-1]}` (it needs `elm-jax data "
        "fetch bigbench` first), or pass the path of a SentencePiece model.")
  with open(sidecar, encoding="utf-8") as f:
    expected = json.load(f)["sha256"]
  actual = fetch.sha256_file(model_path)
  if actual != expected:
    raise fetch.ChecksumError(
        f"{model_path} has sha256 {actual}, but {sidecar} records {expected}. "
        "Rebuild it with `elm-jax data build-vocab`.")


class _DefaultVocabulary(seqio.SentencePieceVocabulary):
  """The default vocabulary, checked against its sidecar when first loaded."""

  def _model_context(self):
    if not self._model:
      verify_default_vocabulary(Path(self.sentencepiece_model_file))
    return super()._model_context()


def get_vocabulary(path: str | None = None, *, extra_ids: int = DEFAULT_EXTRA_IDS,
                   cache: str | os.PathLike[str] | None = None,
                   vocab_size: int = DEFAULT_VOCAB_SIZE,
                   check_exists: bool = True) -> seqio.SentencePieceVocabulary:
  """Returns a SentencePiece vocabulary with `extra_ids` sentinels.

  Args:
    path: a SentencePiece model, local or any tf.io.gfile path (gs:// too), for
      example T5's `sentencepiece.model`. None selects the offline default.
    extra_ids: sentinel ids appended by seqio (T5 uses 100).
    cache: the cache root of the default vocabulary.
    vocab_size: which default vocabulary (its piece count) to use.
    check_exists: when False, a missing default model is reported at first
      use instead of now, so Tasks can be registered before it is built.

  Raises:
    MissingDataError: the model file does not exist; for the default, the
      message names `elm-jax data build-vocab`.
  """
  if path is not None:
    if not tf.io.gfile.exists(path):
      raise fetch.MissingDataError(f"SentencePiece model {path} not found.")
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)
  model_path = default_vocabulary_path(cache, vocab_size)
  if check_exists:
    verify_default_vocabulary(model_path)
  return _DefaultVocabulary(str(model_path), extra_ids=extra_ids)


def padded_vocab_size(vocab: seqio.Vocabulary, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
  """Returns the vocabulary size rounded up to a multiple, as T5 sizes its embeddings."""
  return -(-vocab.vocab_size // multiple) * multiple


def check_vocab_matches(vocab: seqio.Vocabulary, model_vocab_size: int) -> None:
  """Raises ValueError when a model's embedding table is smaller than the vocabulary.

  A larger model vocabulary is fine because T5 pads it to a multiple of 128.
  A smaller one would index past the end of the embedding table.
  """
  if model_vocab_size < vocab.vocab_size:
    raise ValueError(
        f"The model's vocab_size {model_vocab_size} is smaller than the vocabulary's "
        f"{vocab.vocab_size} ids ({getattr(vocab, 'sentencepiece_model_file', vocab)}). "
        f"Set the model's vocab_size to at least {vocab.vocab_size}, for example "
        f"{padded_vocab_size(vocab)}.")
