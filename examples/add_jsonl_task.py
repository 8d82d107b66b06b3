"""Register a prompted seqio Task from a JSON lines file and print a batch.

The script writes a few RTE-shaped examples (premise, hypothesis, label) to JSON
lines files, registers the Task `my_rte_gpt3` (and `my_rte_gpt3_score_eval`) with
promptsource's `super_glue/rte` template "GPT-3 style", and prints rendered
examples, a padded training batch and one scoring example.

  python examples/add_jsonl_task.py [--vocab_path=PATH] [--output_dir=DIR]

Without --vocab_path it uses the default offline vocabulary (build it once with
`elm-jax data build-vocab`). The promptsource templates are fetched on first use.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

TASK_NAME = "my_rte_gpt3"
FEATURE_LENGTHS = {"inputs": 48, "targets": 8}

# RTE examples in the shape of the Hugging Face `super_glue/rte` dataset
# (label 0: entailment, 1: not entailment).
TRAIN_EXAMPLES = [
    {"premise": "The cat sat on the warm windowsill all afternoon.",
     "hypothesis": "A cat was on the windowsill.", "idx": 0, "label": 0},
    {"premise": "The library closes at six on weekdays.",
     "hypothesis": "The library is open all night.", "idx": 1, "label": 1},
    {"premise": "Maria flew from Lisbon to Rome for the conference.",
     "hypothesis": "Maria travelled to Rome.", "idx": 2, "label": 0},
]
VALIDATION_EXAMPLES = [
    {"premise": "The bridge was closed after the storm damaged its supports.",
     "hypothesis": "The storm damaged the bridge.", "idx": 0, "label": 0},
]


def write_jsonl(path: Path, examples: list[dict]) -> Path:
  path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
  return path


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--vocab_path", default=None,
                      help="SentencePiece model file; default: the offline default vocabulary.")
  parser.add_argument("--output_dir", default=None,
                      help="Folder for the JSON lines files; default: a new temporary folder.")
  args = parser.parse_args(argv)

  # Imported here so that --help prints without loading TensorFlow.
  import seqio  # pylint: disable=g-import-not-at-top
  from elm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  from elm_jax.tasks import promptsource  # pylint: disable=g-import-not-at-top

  # 1. The raw examples, one JSON object per line.
  output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="elm_jax_example_"))
  output_dir.mkdir(parents=True, exist_ok=True)
  files = {"train": write_jsonl(output_dir / "rte_train.jsonl", TRAIN_EXAMPLES),
           "validation": write_jsonl(output_dir / "rte_validation.jsonl", VALIDATION_EXAMPLES)}

  # 2. The Task and its scoring variant.
  vocabulary = vocab.get_vocabulary(args.vocab_path)
  names = promptsource.register_prompted_task(
      TASK_NAME, dataset="super_glue", subset="rte", template_name="GPT-3 style",
      source_jsonl=files, vocabulary=vocabulary)
  print("registered:", ", ".join(names))

  # 3. Rendered and tokenized examples.
  task = seqio.get_mixture_or_task(TASK_NAME)
  dataset = task.get_dataset(FEATURE_LENGTHS, split="train", shuffle=False)
  for example in dataset.as_numpy_iterator():
    print("inputs_pretokenized:", repr(example["inputs_pretokenized"].decode()))
    print("targets_pretokenized:", repr(example["targets_pretokenized"].decode()))

  # 4. One padded batch, as the trainer's feature converter builds it.
  converter = seqio.EncDecFeatureConverter(pack=False)
  batches = converter(dataset, FEATURE_LENGTHS).batch(len(TRAIN_EXAMPLES))
  batch = next(batches.as_numpy_iterator())
  for key in sorted(batch):
    print(f"batch[{key!r}] shape={batch[key].shape} dtype={batch[key].dtype}")
  print("encoder_input_tokens[0]:", batch["encoder_input_tokens"][0].tolist())

  # 5. A scoring example: the choices and which of them are correct.
  scoring = seqio.get_mixture_or_task(TASK_NAME + promptsource.SCORE_EVAL_SUFFIX)
  example = next(scoring.get_dataset(FEATURE_LENGTHS, split="validation",
                                     shuffle=False).as_numpy_iterator())
  print("answer_choices:", [c.decode() for c in example["answer_choices"]])
  print("is_correct:", example["is_correct"].tolist())
  return 0


if __name__ == "__main__":
  sys.exit(main())
