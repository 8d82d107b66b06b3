"""Benchmark: shared-encoder rank classification against one forward pass per choice.

Both scorers run in one process on the same random T5 v1.1 small-sized model
(`--quick`: a tiny one) and the same examples: inputs of `--input_length`
tokens and 4 or 8 answer choices of about 4-16 tokens each. The shared scorer
packs all choices of an example into one decoder row, so the encoder runs once
per example. The naive scorer repeats the encoder input for every choice. Timings
exclude compilation (one warm-up batch each) and interleave the two scorers.

  python benchmarks/scorer.py            # T5 v1.1 small size, about 3-5 minutes
  python benchmarks/scorer.py --quick    # tiny model, well under a minute
  python benchmarks/scorer.py --output benchmarks/results/scorer.md

Prints a Markdown section: command, machine, date, examples/s and the ratio.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import flax.linen as nn
import jax
import numpy as np

from elm_jax import file_io
from elm_jax.data import vocab as vocab_lib
from elm_jax.evaluation import scorer as scorer_lib
from elm_jax.models import t5

# T5 v1.1 small: 8 + 8 layers, d_model 512, 6 heads of 64, gated-GELU d_ff 1024.
SMALL = t5.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_heads=6,
                    num_encoder_layers=8, num_decoder_layers=8, dropout_rate=0.0)
TINY = t5.T5Config(vocab_size=8192, d_model=128, d_kv=32, d_ff=256, num_heads=4,
                   num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0)


def _examples(rng, vocabulary, *, count, num_choices, input_length):
  """Random scoring examples; choices are the text of 3-15 random pieces."""
  examples = []
  for idx in range(count):
    inputs = list(rng.integers(3, vocabulary.vocab_size, size=input_length - 1)) + [1]
    choices = [vocabulary.decode([int(t) for t in rng.integers(
        3, vocabulary.vocab_size - 100, size=rng.integers(3, 16))]) for _ in range(num_choices)]
    correct = np.zeros(num_choices, bool)
    correct[0] = True
    examples.append({"inputs": inputs, "answer_choices": choices, "is_correct": correct,
                     "idx": idx})
  return examples


def _time(fn, repeats):
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def run(args) -> str:
  config = TINY if args.quick else SMALL
  input_length = args.input_length or (64 if args.quick else 256)
  model = t5.T5(config)
  tokens = np.ones((1, 4), np.int32)
  params = nn.unbox(model.init(jax.random.PRNGKey(0), tokens, tokens))["params"]
  shared = scorer_lib.ChoiceScorer(model)
  naive_apply = jax.jit(lambda p, e, d, t: model.apply({"params": p}, e, d, t))
  rng = np.random.default_rng(0)
  # The offline default SentencePiece vocabulary (`elm-jax data build-vocab`).
  vocabulary = vocab_lib.get_vocabulary()

  rows = []
  for num_choices in (4, 8):
    examples = _examples(rng, vocabulary, count=args.batch_size, num_choices=num_choices,
                         input_length=input_length)
    batch, = scorer_lib.make_batches(examples, vocabulary=vocabulary,
                                     batch_size=args.batch_size)

    def shared_fn():
      sums, _ = shared.log_likelihoods(params, batch)
      return sums

    def naive_fn():
      return scorer_lib.naive_log_likelihoods(model, params, batch, apply_fn=naive_apply)[0]

    # Warm-up compiles both and checks they agree.
    difference = np.max(np.abs((shared_fn() - naive_fn())[batch["choice_mask"]]))
    shared_times, naive_times = [], []
    for _ in range(args.repeats):  # Interleaved, so machine noise hits both alike.
      shared_times += _time(shared_fn, 1)
      naive_times += _time(naive_fn, 1)
    shared_rate = args.batch_size / statistics.median(shared_times)
    naive_rate = args.batch_size / statistics.median(naive_times)
    rows.append((num_choices, batch["decoder_target_tokens"].shape[1], shared_rate,
                 naive_rate, shared_rate / naive_rate, difference))

  command = "python benchmarks/scorer.py " + " ".join(sys.argv[1:])
  lines = [
      "## Rank classification: shared encoder vs one pass per choice",
      "",
      f"- command: `{command.strip()}`",
      f"- machine: {platform.machine()}, {os.cpu_count()} CPUs ({platform.processor() or 'n/a'}), "
      f"jax {jax.__version__} on {jax.devices()[0].platform}",
      f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
      f"- model: {'tiny' if args.quick else 'T5 v1.1 small size'} (d_model {config.d_model}, "
      f"{config.num_encoder_layers}+{config.num_decoder_layers} layers, vocab "
      f"{config.vocab_size}), random weights, float32",
      f"- batch: {args.batch_size} examples, inputs {input_length} tokens, choices of 3-15 "
      f"random SentencePiece pieces (re-tokenized) plus EOS; median of {args.repeats} interleaved runs after a warm-up",
      "",
      "| choices | packed decoder length | shared (examples/s) | naive (examples/s) "
      "| speed-up | max abs difference |",
      "|---|---|---|---|---|---|",
  ]
  for num_choices, dec_len, shared_rate, naive_rate, ratio, diff in rows:
    lines.append(f"| {num_choices} | {dec_len} | {shared_rate:.2f} | {naive_rate:.2f} | "
                 f"{ratio:.2f}x | {diff:.1e} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="use a tiny model and 64-token inputs")
  parser.add_argument("--batch_size", type=int, default=8, help="examples per batch")
  parser.add_argument("--repeats", type=int, default=3, help="timed batches per scorer")
  parser.add_argument("--input_length", type=int, default=None,
                      help="input tokens per example (default 256, 64 with --quick)")
  parser.add_argument("--output", default=None, help="also write the section to this file")
  args = parser.parse_args()
  section = run(args)
  print(section)
  if args.output:
    file_io.write_text_atomic(args.output, section)


if __name__ == "__main__":
  main()
