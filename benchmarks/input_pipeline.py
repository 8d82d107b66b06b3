"""Input-pipeline throughput and packing efficiency on the held-in BIG-bench mixture.

Side by side in one run, for several feature lengths: seqio's packing
(`EncDecFeatureConverter(pack=True)`), this project's first-fit packing in numpy
(`feature_converters.pack_first_fit`) and in tf.data as the trainer runs it
(`FirstFitEncDecFeatureConverter`, "first-fit (trainer)"), and no packing. The
pipeline reads `bigbench_held_in` (every held-in multiple-choice task file, at
most 2,000 examples each), tokenizes with the default vocabulary, packs and
batches. The figures to compare against are the tokens/s of the training step
this pipeline feeds.

  python benchmarks/input_pipeline.py            # about 5 minutes on 2 quiet cores
  python benchmarks/input_pipeline.py --quick    # about 2 minutes

Prints a Markdown section; `--output FILE` also writes it there.
"""

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=g-import-not-at-top
import seqio  # pylint: disable=g-import-not-at-top

from elm_jax import file_io  # pylint: disable=g-import-not-at-top
from elm_jax.data import feature_converters as fc  # pylint: disable=g-import-not-at-top
from elm_jax.tasks import bigbench as bigbench_tasks  # pylint: disable=g-import-not-at-top

# Measured tokens/s of a tiny T5 training step (d_model 128, 2 + 2 layers,
# batch 32 x (128 + 16), fp32, JAX) on a 2-core AMD EPYC machine, by the project.
TRAIN_STEP_TOKENS_PER_S = 18_000
METHODS = ("first-fit", "first-fit (trainer)", "seqio", "padded")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def _examples_in(batch: dict[str, np.ndarray], packed: bool) -> int:
  if packed:
    return int(sum(len(np.unique(row[row > 0])) for row in batch["encoder_segment_ids"]))
  return int(np.count_nonzero(batch["decoder_target_tokens"].any(axis=1)))


def _batches(lengths: dict[str, int], batch_size: int, method: str, seed: int):
  if method == "first-fit (trainer)":
    return seqio.get_dataset(
        bigbench_tasks.HELD_IN_MIXTURE, task_feature_lengths=lengths, dataset_split="train",
        shuffle=True, seed=seed, batch_size=batch_size,
        feature_converter=fc.FirstFitEncDecFeatureConverter(seed=seed)).as_numpy_iterator()
  if method == "first-fit":
    mixture = seqio.get_mixture_or_task(bigbench_tasks.HELD_IN_MIXTURE)
    examples = mixture.get_dataset(lengths, split="train", shuffle=True, seed=seed)
    return fc.pack_first_fit(examples.as_numpy_iterator(), task_feature_lengths=lengths,
                             batch_size=batch_size, seed=seed)
  return fc.training_dataset(
      bigbench_tasks.HELD_IN_MIXTURE, task_feature_lengths=lengths, batch_size=batch_size,
      seed=seed, pack=method == "seqio").as_numpy_iterator()


def measure(lengths: dict[str, int], batch_size: int, num_batches: int, warmup: int,
            method: str, seed: int) -> dict[str, float]:
  """Returns startup seconds, rates and efficiencies over `num_batches` batches.

  The first `warmup` batches are not timed: tf.data starts ~300 Task pipelines
  and tunes their parallelism during the first few thousand examples.
  """
  start = time.perf_counter()
  iterator = _batches(lengths, batch_size, method, seed)
  for _ in range(warmup):
    next(iterator)
  startup = time.perf_counter() - start

  examples = 0
  encoder_real = decoder_real = total = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    batch = next(iterator)
    examples += _examples_in(batch, method != "padded")
    encoder_real += np.count_nonzero(batch["encoder_input_tokens"])
    decoder_real += np.count_nonzero(batch["decoder_target_tokens"])
    total += batch["encoder_input_tokens"].size + batch["decoder_target_tokens"].size
  seconds = time.perf_counter() - start
  real = encoder_real + decoder_real
  rows = num_batches * batch_size
  return {
      "startup_s": startup,
      "examples_per_s": examples / seconds,
      "real_tokens_per_s": real / seconds,
      "efficiency": real / total,
      "encoder_efficiency": encoder_real / (rows * lengths["inputs"]),
      "decoder_efficiency": decoder_real / (rows * lengths["targets"]),
      "examples_per_row": examples / rows,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer batches and lengths")
  parser.add_argument("--batch-size", type=int, default=32, help="rows per batch")
  parser.add_argument("--batches", type=int, default=None,
                      help="batches timed per setting (default 60, 20 with --quick)")
  parser.add_argument("--warmup", type=int, default=None,
                      help="untimed batches first (default 40, 20 with --quick)")
  parser.add_argument("--lengths", default=None,
                      help="comma-separated INPUTS:TARGETS pairs (default 256:16,512:32)")
  parser.add_argument("--seed", type=int, default=0, help="mixing and shuffling seed")
  parser.add_argument("--output", default=None, help="also write the Markdown here")
  args = parser.parse_args(argv)

  default_lengths = "256:16" if args.quick else "256:16,512:32"
  pairs = [tuple(int(x) for x in pair.split(":"))
           for pair in (args.lengths or default_lengths).split(",")]
  num_batches = args.batches or (20 if args.quick else 60)
  warmup = args.warmup
  if warmup is None:
    warmup = 20 if args.quick else 40

  rows = []
  for inputs_length, targets_length in pairs:
    lengths = {"inputs": inputs_length, "targets": targets_length}
    for method in METHODS:
      result = measure(lengths, args.batch_size, num_batches, warmup, method, args.seed)
      rows.append((inputs_length, targets_length, method, result))
      print(f"measured {lengths} {method}: {result}", file=sys.stderr)

  command = "python benchmarks/input_pipeline.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv)
  lines = [
      "## Input pipeline: held-in BIG-bench mixture, packed vs padded",
      "",
      f"- Command: `{command.strip()}`",
      f"- Machine: {_cpu_model()}, {os.cpu_count()} CPUs visible, Python "
      f"{platform.python_version()}; load average at the end "
      f"{os.getloadavg()[0]:.1f} (the benchmark itself keeps about 2 busy).",
      f"- Date: {datetime.date.today().isoformat()}",
      f"- Batch size {args.batch_size}; per row {warmup} untimed batches (startup: "
      f"building ~300 Task pipelines, reading cached splits, warming up), then "
      f"{num_batches} timed batches.",
      "",
      "| inputs:targets | packing | examples/s | real tokens/s | efficiency "
      "(enc / dec) | examples per row | startup s |",
      "|---|---|---|---|---|---|---|",
  ]
  by_key = {}
  for inputs_length, targets_length, method, r in rows:
    by_key[(inputs_length, targets_length, method)] = r
    lines.append(
        f"| {inputs_length}:{targets_length} | {method} | "
        f"{r['examples_per_s']:,.0f} | {r['real_tokens_per_s']:,.0f} | "
        f"{r['efficiency']:.1%} ({r['encoder_efficiency']:.1%} / "
        f"{r['decoder_efficiency']:.1%}) | {r['examples_per_row']:.2f} | "
        f"{r['startup_s']:.1f} |")
  lines.append("")
  for inputs_length, targets_length in pairs:
    dense = by_key[(inputs_length, targets_length, "first-fit")]
    trainer = by_key[(inputs_length, targets_length, "first-fit (trainer)")]
    greedy = by_key[(inputs_length, targets_length, "seqio")]
    padded = by_key[(inputs_length, targets_length, "padded")]
    lines.append(
        f"- {inputs_length}:{targets_length}: efficiency first-fit / seqio packing "
        f"{dense['efficiency'] / greedy['efficiency']:.2f}x, seqio packing / padding "
        f"{greedy['efficiency'] / padded['efficiency']:.2f}x. The first-fit pipeline "
        f"delivers {dense['real_tokens_per_s'] / TRAIN_STEP_TOKENS_PER_S:.1f}x the ~18k "
        "tokens/s of a tiny T5 training step (the project's measurement, not rerun here), "
        f"and the trainer's tf.data form {trainer['real_tokens_per_s'] / TRAIN_STEP_TOKENS_PER_S:.1f}x "
        f"at {trainer['efficiency']:.1%} efficiency.")
  text = "\n".join(lines) + "\n"
  print(text)
  if args.output:
    file_io.write_text_atomic(args.output, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
