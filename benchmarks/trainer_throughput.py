"""Trainer step throughput: elm-jax's jitted train step against Hugging Face PyTorch T5.

Both train the same T5 v1.1-style config (gated-GELU, untied LM head, no dropout)
with AdamW on the same random token batches, and report target+input tokens per
second (padded positions: batch * (input length + target length)) as the median
of interleaved timing rounds. The elm-jax step is the one `trainer.train` runs
(`train_step.make_train_step` on the sharded `TrainState` from
`state_init.initialize`, donated and jitted), on all local devices.

  python benchmarks/trainer_throughput.py --quick
"""

import argparse
import datetime
import platform
import statistics
import time

import jax
import numpy as np

from elm_jax import partitioning
from elm_jax.models import t5
from elm_jax.training import optimizers
from elm_jax.training import sharding
from elm_jax.training import state_init
from elm_jax.training import train_step

SIZES = {
    # name: (d_model, d_kv, d_ff, heads, layers, batch, inputs, targets)
    "quick": (128, 32, 256, 4, 2, 16, 128, 16),
    "small": (256, 64, 512, 4, 4, 16, 128, 32),
}
VOCAB = 8100


def _batches(rng: np.random.Generator, count: int, batch: int, inputs: int, targets: int):
  out = []
  for _ in range(count):
    enc = rng.integers(2, VOCAB, size=(batch, inputs), dtype=np.int32)
    tgt = rng.integers(2, VOCAB, size=(batch, targets), dtype=np.int32)
    dec_in = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append({"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                "decoder_target_tokens": tgt,
                "decoder_loss_weights": np.ones((batch, targets), np.float32)})
  return out


def _jax_runner(size, batches):
  d_model, d_kv, d_ff, heads, layers, _, _, _ = size
  config = t5.T5Config(vocab_size=VOCAB, d_model=d_model, d_kv=d_kv, d_ff=d_ff,
                       num_heads=heads, num_encoder_layers=layers,
                       num_decoder_layers=layers, dropout_rate=0.0)
  mesh_config = sharding.MeshConfig()
  mesh, rules = mesh_config.build(), mesh_config.axis_rules
  tx = optimizers.make_optimizer(optimizers.adamw(1e-4))
  setup = state_init.initialize(model_config=config, optimizer=tx, mesh=mesh, rules=rules,
                                trainable="full", train_layer_norms=None, seed=0,
                                initial_checkpoint_path=None)
  step = train_step.make_train_step(model=t5.T5(config), optimizer=tx,
                                    loss_config=train_step.LossConfig(z_loss=0.0))
  batch_sharding = partitioning.data_sharding(mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with partitioning.activate(mesh, rules):
    jitted = jax.jit(step, in_shardings=(setup.state_shardings, batch_sharding),
                     out_shardings=(setup.state_shardings, replicated), donate_argnums=(0,))
  device_batches = [sharding.global_batch(b, batch_sharding) for b in batches]
  state = {"value": setup.state}

  def run(count: int) -> float:
    start = time.perf_counter()
    with partitioning.activate(mesh, rules):
      for i in range(count):
        state["value"], metrics = jitted(state["value"], device_batches[i % len(device_batches)])
      jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start
  return run, setup.num_params


def _torch_runner(size, batches):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  d_model, d_kv, d_ff, heads, layers, _, _, _ = size
  config = transformers.T5Config(
      vocab_size=VOCAB, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
      num_layers=layers, num_decoder_layers=layers, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, dropout_rate=0.0, decoder_start_token_id=0)
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(config)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
  torch_batches = [{k: torch.from_numpy(v) for k, v in b.items()} for b in batches]

  def run(count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
      b = torch_batches[i % len(torch_batches)]
      out = model(input_ids=b["encoder_input_tokens"],
                  attention_mask=(b["encoder_input_tokens"] > 0).long(),
                  decoder_input_ids=b["decoder_input_tokens"],
                  labels=b["decoder_target_tokens"].long())
      optimizer.zero_grad(set_to_none=True)
      out.loss.backward()
      optimizer.step()
    return time.perf_counter() - start
  return run, sum(p.numel() for p in model.parameters())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="tiny config, few steps")
  parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds")
  parser.add_argument("--steps", type=int, default=None, help="steps per round")
  args = parser.parse_args()
  size_name = "quick" if args.quick else "small"
  size = SIZES[size_name]
  rounds = args.rounds or (3 if args.quick else 5)
  steps = args.steps or (5 if args.quick else 10)
  batch, inputs, targets = size[5:]
  batches = _batches(np.random.default_rng(0), 4, batch, inputs, targets)
  tokens_per_step = batch * (inputs + targets)

  jax_run, jax_params = _jax_runner(size, batches)
  torch_run, torch_params = _torch_runner(size, batches)
  jax_run(2)  # Compile and warm up.
  torch_run(2)
  jax_rates, torch_rates = [], []
  for _ in range(rounds):
    jax_rates.append(steps * tokens_per_step / jax_run(steps))
    torch_rates.append(steps * tokens_per_step / torch_run(steps))
  jax_median, torch_median = statistics.median(jax_rates), statistics.median(torch_rates)

  d_model, d_kv, d_ff, heads, layers = size[:5]
  import torch  # pylint: disable=g-import-not-at-top
  print(f"## Trainer throughput ({size_name})\n")
  print(f"Command: `python benchmarks/trainer_throughput.py{' --quick' if args.quick else ''}`  ")
  print(f"Machine: {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} JAX {jax.devices()[0].platform} device(s), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads  ")
  print(f"Date: {datetime.date.today().isoformat()}  ")
  print(f"Config: d_model {d_model}, d_kv {d_kv}, d_ff {d_ff}, {heads} heads, "
        f"{layers}+{layers} layers, vocab {VOCAB}; batch {batch} x ({inputs} + {targets}) "
        f"tokens; AdamW; {rounds} rounds of {steps} steps, medians\n")
  print("| implementation | parameters | tokens/s | steps/s |")
  print("|---|---|---|---|")
  print(f"| elm-jax train step (jit, donated state) | {jax_params:,} | {jax_median:,.0f} | "
        f"{jax_median / tokens_per_step:.2f} |")
  print(f"| Hugging Face transformers T5, PyTorch eager | {torch_params:,} | "
        f"{torch_median:,.0f} | {torch_median / tokens_per_step:.2f} |")
  print(f"\nRatio elm-jax / PyTorch: {jax_median / torch_median:.2f}")


if __name__ == "__main__":
  main()
