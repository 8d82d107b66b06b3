"""T5 v1.1 training step: elm-jax (JAX/XLA) against Hugging Face T5 in PyTorch.

Peer: `transformers.T5ForConditionalGeneration` (PyTorch eager, CPU) with
`torch.optim.AdamW`. Both run the same config from random initialization, with
dropout 0.1 on, on the same batch (random tokens, no padding), and take one full
training step: forward, cross-entropy over the target tokens, backward, AdamW
update (lr 1e-4, weight decay 0.01). The JAX step is jitted with the train state
donated. JAX runs twice, with default XLA flags and with
`--xla_cpu_experimental_ynn_fusion_type=dot`.

Each framework runs in its own worker process, because XLA flags are per
process. The parent interleaves single steps round-robin, so load changes on the
machine hit all of them alike, and reports the median step time. A forward-only pass
(same loss, no gradient) is timed the same way, which splits each step into
forward and backward + update.

Tokens per second count encoder and decoder tokens: batch * (inputs + targets).

  python benchmarks/t5_train_step.py              # T5 v1.1 small, 8 x (256 + 32)
  python benchmarks/t5_train_step.py --quick      # tiny T5, 32 x (128 + 16)
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from elm_jax import file_io

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type=dot"
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 0.01

# T5 v1.1 small as published (google/t5-v1_1-small config.json), and a tiny T5.
SIZES = {
    "small": dict(config=dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024,
                              num_heads=6, num_layers=8, num_decoder_layers=8),
                  batch=8, inputs=256, targets=32),
    "tiny": dict(config=dict(vocab_size=32128, d_model=128, d_kv=32, d_ff=256,
                             num_heads=4, num_layers=2, num_decoder_layers=2),
                 batch=32, inputs=128, targets=16),
}
COMMON = dict(relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.1, layer_norm_epsilon=1e-6, feed_forward_proj="gated-gelu",
              tie_word_embeddings=False)


def make_batch(size):
  """Builds the same numpy batch in every worker (fixed seed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  spec = SIZES[size]
  rng = np.random.default_rng(0)
  vocab = spec["config"]["vocab_size"]
  inputs = rng.integers(2, vocab, size=(spec["batch"], spec["inputs"]), dtype=np.int32)
  targets = rng.integers(2, vocab, size=(spec["batch"], spec["targets"]), dtype=np.int32)
  decoder_inputs = np.concatenate(
      [np.zeros((spec["batch"], 1), np.int32), targets[:, :-1]], axis=1)  # shift right
  return inputs, decoder_inputs, targets


class JaxWorker:
  """elm-jax's T5 with optax AdamW; `step` is jitted with the state donated."""

  def __init__(self, size):
    import functools  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top
    from elm_jax.checkpoints import hf  # pylint: disable=g-import-not-at-top
    from elm_jax.models import t5  # pylint: disable=g-import-not-at-top

    self.jax = jax
    config = hf.config_from_hf({**COMMON, **SIZES[size]["config"]})
    model = t5.T5(config)
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    enc, dec, tgt = (jnp.asarray(x) for x in make_batch(size))
    self.batch = (enc, dec, tgt)

    def loss_fn(params, batch, rng):
      enc, dec, tgt = batch
      logits = model.apply({"params": params}, enc, dec, tgt, enable_dropout=True,
                           rngs={"dropout": rng})  # [batch, targets, vocab]
      log_probs = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(log_probs, tgt[..., None], axis=-1)[..., 0]
      weights = (tgt > 0).astype(jnp.float32)
      return jnp.sum(nll * weights) / jnp.sum(weights)

    @functools.partial(jax.jit, donate_argnums=(0,))
    def train_step(state, batch):
      params, opt_state, step = state
      loss, grads = jax.value_and_grad(loss_fn)(params, batch,
                                                jax.random.fold_in(jax.random.key(0), step))
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state, step + 1), loss

    self.forward = jax.jit(lambda params, batch: loss_fn(params, batch, jax.random.key(1)))
    start = time.perf_counter()
    params = t5.init_params(config, jax.random.key(0))
    self.state = (params, tx.init(params), jnp.zeros((), jnp.int32))
    compiled = train_step.lower(self.state, self.batch).compile()
    self.train_step = compiled
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.info = {"setup_s": time.perf_counter() - start,
                 "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
                 "params": t5.count_params(params)}

  def step(self):
    self.state, loss = self.train_step(self.state, self.batch)
    loss.block_until_ready()

  def forward_only(self):
    self.forward(self.state[0], self.batch).block_until_ready()


class TorchWorker:
  """Hugging Face T5ForConditionalGeneration with torch.optim.AdamW, eager."""

  def __init__(self, size):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    self.torch = torch
    start = time.perf_counter()
    torch.manual_seed(0)
    config = transformers.T5Config(decoder_start_token_id=0, **COMMON, **SIZES[size]["config"])
    self.model = transformers.T5ForConditionalGeneration(config).train()
    self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE,
                                       weight_decay=WEIGHT_DECAY)
    enc, dec, tgt = (torch.as_tensor(x, dtype=torch.long) for x in make_batch(size))
    self.inputs = dict(input_ids=enc, attention_mask=enc > 0, decoder_input_ids=dec,
                       labels=tgt.masked_fill(tgt == 0, -100))
    self.info = {"setup_s": time.perf_counter() - start,
                 "params": sum(p.numel() for p in self.model.parameters()),
                 "threads": torch.get_num_threads()}

  def step(self):
    self.optimizer.zero_grad(set_to_none=True)
    self.model(**self.inputs).loss.backward()
    self.optimizer.step()

  def forward_only(self):
    with self.torch.no_grad():
      self.model(**self.inputs).loss.item()


def run_worker(kind, size):
  """Serves `step` and `forward` requests on stdin, one JSON line per reply."""
  worker = (JaxWorker if kind == "jax" else TorchWorker)(size)
  worker.step()  # Warm-up: first-call allocation and, for torch, lazy init.
  print(json.dumps(worker.info), flush=True)
  for line in sys.stdin:
    command = line.strip()
    if command == "quit":
      return
    action = worker.step if command == "step" else worker.forward_only
    start = time.perf_counter()
    action()
    print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


class Client:
  """A worker subprocess: one request line in, one JSON line out."""

  def __init__(self, name, kind, size, xla_flags=None):
    env = dict(os.environ, USE_TF="0", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if xla_flags:
      env["XLA_FLAGS"] = xla_flags
    self.name = name
    self.process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--worker", kind, "--size", size],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def read(self):
    line = self.process.stdout.readline()
    if not line:
      raise RuntimeError(f"Benchmark worker {self.name} exited with code "
                         f"{self.process.wait()}; its error output is above.")
    return json.loads(line)

  def request(self, command):
    self.process.stdin.write(command + "\n")
    self.process.stdin.flush()
    return self.read()["seconds"]

  def close(self):
    if self.process.poll() is None:
      self.process.stdin.write("quit\n")
      self.process.stdin.close()
      self.process.wait()


def describe_machine():
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} CPUs"


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="Tiny T5, for a check in seconds.")
  parser.add_argument("--repeats", type=int, default=None,
                      help="Interleaved timed steps per framework (default 5, quick 10).")
  parser.add_argument("--output", help="Also write the Markdown section to this file.")
  parser.add_argument("--note", default="", help="A line appended to the Markdown section.")
  parser.add_argument("--worker", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    run_worker(args.worker, args.size)
    return 0

  size = "tiny" if args.quick else "small"
  repeats = args.repeats or (10 if args.quick else 5)
  spec = SIZES[size]
  tokens = spec["batch"] * (spec["inputs"] + spec["targets"])
  load_before = os.getloadavg()

  # 1. Start the workers; each builds its model and compiles or warms up once.
  clients = [Client("elm-jax, default XLA flags", "jax", size),
             Client(f"elm-jax, {YNN_FLAG}", "jax", size, YNN_FLAG),
             Client("HF T5, PyTorch eager", "torch", size)]
  try:
    infos = [c.read() for c in clients]

    # 2. Interleave single steps, then single forward passes.
    steps = {c.name: [] for c in clients}
    forwards = {c.name: [] for c in clients}
    for _ in range(repeats):
      for c in clients:
        steps[c.name].append(c.request("step"))
    for _ in range(max(3, repeats // 2)):
      for c in clients:
        forwards[c.name].append(c.request("forward"))
  finally:
    for c in clients:
      c.close()

  # 3. Report.
  torch_name = clients[-1].name
  torch_median = statistics.median(steps[torch_name])
  flops = infos[0]["flops"]
  cfg = spec["config"]
  lines = [
      "## T5 v1.1 training step: elm-jax vs Hugging Face PyTorch (benchmarks/t5_train_step.py)",
      "",
      f"Command: `python benchmarks/t5_train_step.py{' --quick' if args.quick else ''}`  ",
      f"Machine: {describe_machine()}, {platform.system()}; load average "
      f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; "
      f"{datetime.date.today().isoformat()}  ",
      f"Model: T5 v1.1 {'small' if size == 'small' else 'tiny'} (d_model {cfg['d_model']}, "
      f"d_kv {cfg['d_kv']}, heads {cfg['num_heads']}, d_ff {cfg['d_ff']}, "
      f"{cfg['num_layers']}+{cfg['num_decoder_layers']} layers, vocab {cfg['vocab_size']}, "
      f"gated GELU, untied), {infos[0]['params']:,} parameters (HF: {infos[2]['params']:,}); "
      f"float32, dropout 0.1, AdamW  ",
      f"Batch: {spec['batch']} x ({spec['inputs']} + {spec['targets']}) tokens; median of "
      f"{repeats} interleaved steps after one warm-up step; torch threads "
      f"{infos[2]['threads']}.",
      "",
      "| implementation | step s (median) | tokens/s | vs PyTorch | forward s | "
      "backward + update s | GFLOP/s (XLA count) |",
      "|---|---|---|---|---|---|---|",
  ]
  for c in clients:
    step_s = statistics.median(steps[c.name])
    forward_s = statistics.median(forwards[c.name])
    lines.append(
        f"| {c.name} | {step_s:.3f} | {tokens / step_s:,.0f} | {torch_median / step_s:.2f}x | "
        f"{forward_s:.3f} | {step_s - forward_s:.3f} | {flops / step_s / 1e9:.1f} |")
  lines += [
      "",
      f"FLOPs per step (XLA cost analysis of the jitted JAX step): {flops / 1e9:.1f} GFLOP; "
      "the GFLOP/s column divides that one count by each step time.",
  ]
  if args.note:
    lines += ["", args.note]
  text = "\n".join(lines) + "\n"
  print(text)
  if args.output:
    file_io.write_text_atomic(args.output, text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
