"""Adapter training against full fine-tuning of the same T5: step time and memory.

Peer: full fine-tuning of the same model in the same process, with AdamW (as the
prompt experts use) and with Adafactor (as the dataset experts use). The adapter
run trains bottleneck adapters (reduction factor 64, as the method uses for XL)
plus the layer norms with AdamW, differentiating only those parameters
(`optimizers.split_trainable`), as the trainer does.

Widths are XL's scaled down (d_model 1024, d_kv 64, 16 heads, d_ff 2816) so the
run fits a CPU. Steps of the configurations are interleaved and the median is
reported.

Memory is XLA's compiled memory analysis of each jitted train step
(`jit(...).lower(...).compile().memory_analysis()`): arguments + outputs -
aliased (donated) buffers + temporaries, i.e. the peak bytes the step needs on
the device, not process RSS. The live bytes of the train state (parameters and
optimizer state) are listed too.

  python benchmarks/adapter_vs_full.py            # full size, a few minutes on 2 cores
  python benchmarks/adapter_vs_full.py --quick    # small model, seconds
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
import jax.numpy as jnp
import numpy as np
import optax

from elm_jax.models import t5
from elm_jax.training import losses
from elm_jax.training import optimizers


def _config(quick: bool, adapter: bool) -> t5.T5Config:
  sizes = (dict(vocab_size=2048, d_model=256, d_kv=32, d_ff=704, num_heads=8,
                num_encoder_layers=1, num_decoder_layers=1) if quick else
           dict(vocab_size=8192, d_model=1024, d_kv=64, d_ff=2816, num_heads=16,
                num_encoder_layers=2, num_decoder_layers=2))
  return t5.T5Config(**sizes, dropout_rate=0.0,
                     adapter=t5.AdapterConfig(reduction_factor=64) if adapter else None)


def _batch(config, batch_size, input_length, target_length, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(2, config.vocab_size, size=(batch_size, input_length), dtype=np.int32)
  targets = rng.integers(2, config.vocab_size, size=(batch_size, target_length), dtype=np.int32)
  decoder_inputs = np.concatenate([np.zeros((batch_size, 1), np.int32), targets[:, :-1]], axis=1)
  return {
      "encoder_input_tokens": jnp.asarray(inputs),
      "decoder_input_tokens": jnp.asarray(decoder_inputs),
      "decoder_target_tokens": jnp.asarray(targets),
      "decoder_loss_weights": jnp.ones(targets.shape, jnp.float32),
  }


def _nbytes(tree) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree))


class Run:
  """One configuration: its jitted step, state and compiled memory figures."""

  def __init__(self, name, config, mode, optimizer, batch):
    self.name, self.mode = name, mode
    model = t5.T5(config)
    tokens = batch["encoder_input_tokens"][:1, :8]
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, tokens, tokens)
    params = nn.unbox(params)["params"]
    mask = optimizers.trainable_mask(params, mode)
    self.trainable, self.frozen = optimizers.split_trainable(params, mask)
    self.num_params = optimizers.count_parameters(params)
    self.num_trainable = optimizers.count_parameters(self.trainable)
    tx = optimizers.make_optimizer(optimizer, clip_norm=1.0)
    self.opt_state = tx.init(self.trainable)

    def loss_fn(trainable, frozen, batch):
      logits = model.apply({"params": optimizers.merge_params(trainable, frozen)},
                           batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                           batch["decoder_target_tokens"])
      out = losses.token_cross_entropy(logits, batch["decoder_target_tokens"],
                                       batch["decoder_loss_weights"])
      return out.loss_sum / out.weight_sum

    def step(trainable, opt_state, frozen, batch):
      loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, batch)
      updates, opt_state = tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    start = time.perf_counter()
    self.compiled = jitted.lower(self.trainable, self.opt_state, self.frozen, batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.state_bytes = _nbytes(params) + _nbytes(self.opt_state)
    analysis = self.compiled.memory_analysis()
    self.peak_bytes = None
    if analysis is not None:
      self.peak_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                         - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
      self.temp_bytes = analysis.temp_size_in_bytes
    self.times = []

  def step(self, batch):
    start = time.perf_counter()
    self.trainable, self.opt_state, loss = self.compiled(
        self.trainable, self.opt_state, self.frozen, batch)
    loss.block_until_ready()
    self.times.append(time.perf_counter() - start)
    return float(loss)


def _mib(n):
  return "n/a" if n is None else f"{n / 2**20:,.1f}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="small model, 2 timed steps")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration")
  parser.add_argument("--batch_size", type=int, default=4)
  parser.add_argument("--input_length", type=int, default=128)
  parser.add_argument("--target_length", type=int, default=32)
  args = parser.parse_args(argv)
  steps = args.steps or (2 if args.quick else 5)

  adapter_config = _config(args.quick, adapter=True)
  full_config = _config(args.quick, adapter=False)
  batch = _batch(full_config, args.batch_size, args.input_length, args.target_length)
  runs = [
      Run("full, AdamW", full_config, "full", optimizers.adamw(1e-4), batch),
      Run("full, Adafactor", full_config, "full", optimizers.adafactor(1e-4), batch),
      Run("adapter r=64 + layer norms, AdamW", adapter_config, "adapter",
          optimizers.adamw(1e-4), batch),
  ]
  for run in runs:  # Warm-up step, not timed.
    run.step(batch)
    run.times.clear()
  for _ in range(steps):
    for run in runs:
      run.step(batch)

  full, adapter = runs[0], runs[2]
  medians = {run.name: statistics.median(run.times) for run in runs}
  tokens = args.batch_size * (args.input_length + args.target_length)
  c = full_config
  lines = [
      "## Adapter training vs full fine-tuning (benchmarks/adapter_vs_full.py)",
      "",
      f"Command: `python benchmarks/adapter_vs_full.py{' --quick' if args.quick else ''}`  ",
      f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} on "
      f"{jax.devices()[0].platform}; {datetime.date.today().isoformat()}  ",
      f"Model: d_model {c.d_model}, d_kv {c.d_kv}, heads {c.num_heads}, d_ff {c.d_ff}, "
      f"{c.num_encoder_layers}+{c.num_decoder_layers} layers, vocab {c.vocab_size}, "
      f"adapter width {adapter_config.adapter_width} (reduction factor 64); batch "
      f"{args.batch_size} x ({args.input_length} + {args.target_length}) tokens; float32; "
      f"median of {steps} interleaved steps after one warm-up step.",
      "",
      "| configuration | trainable / total params | step s | tokens/s | peak step memory MiB "
      "(XLA analysis) | params + optimizer state MiB |",
      "|---|---|---|---|---|---|",
  ]
  for run in runs:
    lines.append(
        f"| {run.name} | {run.num_trainable:,} / {run.num_params:,} | {medians[run.name]:.3f} | "
        f"{tokens / medians[run.name]:,.0f} | {_mib(run.peak_bytes)} | {_mib(run.state_bytes)} |")
  lines.append("")
  time_ratio = medians[adapter.name] / medians[full.name]
  lines.append(f"Step time ratio adapter / full (AdamW): {time_ratio:.2f}x (goal <= 0.8x)  ")
  lines.append(f"Step time ratio adapter / full (Adafactor): "
               f"{medians[adapter.name] / medians[runs[1].name]:.2f}x  ")
  if full.peak_bytes and adapter.peak_bytes:
    lines.append(f"Peak memory ratio adapter / full (AdamW): "
                 f"{adapter.peak_bytes / full.peak_bytes:.2f}x (goal <= 0.35x)  ")
    lines.append(f"Peak memory ratio adapter / full (Adafactor): "
                 f"{adapter.peak_bytes / runs[1].peak_bytes:.2f}x  ")
  lines.append(f"State memory ratio adapter / full (AdamW): "
               f"{adapter.state_bytes / full.state_bytes:.2f}x")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
