"""Helpers for library and retrieval tests: expert folders and BIG-bench instances.

Expert folders are written in the expert file format (expert.json + a small
params.safetensors), so the tests do not depend on the trainer.
"""

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from elm_jax.library.instances import Instance

# Distinct BIG-bench multiple-choice tasks with at least 200 examples each.
ROUTING_TASKS = ("navigate", "date_understanding", "sports_understanding",
                 "disambiguation_qa", "epistemic_reasoning", "timedial",
                 "presuppositions_as_nli", "physics")


def write_expert(folder: Path, expert_id: str, task: str = "task", *,
                 seed: int = 0, kind: str = "prompt") -> Path:
  """Writes an expert folder with a 3-tensor parameter file; returns the folder."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  params = {
      "encoder/layers_0/attention_adapter/down/kernel": rng.normal(size=(7, 3)).astype(np.float32),
      "encoder/layers_0/attention_adapter/up/kernel": rng.normal(size=(3, 7)).astype(np.float32),
      "encoder/encoder_norm/scale": np.ones(7, np.float32),
  }
  save_file(params, str(folder / "params.safetensors"))
  digest = hashlib.sha256((folder / "params.safetensors").read_bytes()).hexdigest()
  meta = {
      "id": expert_id, "kind": kind, "task": task, "dataset": task, "prompt": None,
      "base_fingerprint": "0" * 64, "model_config": {"d_model": 7},
      "adapter": {"reduction_factor": 2}, "lora": None, "trainable": "adapter",
      "gin_config": "", "steps": 1, "data_hash": "0" * 64, "validation_metrics": {},
      "created": "2024-01-01T00:00:00+00:00", "train_seconds": 0.0,
      "parameters": "params.safetensors", "parameters_sha256": digest,
  }
  (folder / "expert.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
  return folder


def write_jsonl(path: Path, instances) -> Path:
  with open(path, "w", encoding="utf-8") as f:
    for x in instances:
      f.write(json.dumps(x.to_json()) + "\n")
  return Path(path)


def bigbench_split(bigbench_dir: Path, task: str, *, held_out: float = 0.3,
                   seed: int = 0) -> tuple[list[Instance], list[Instance]]:
  """Reads a BIG-bench task.json; returns (train, held-out) instances, disjoint.

  Identical inputs are kept once, so no held-out input also appears in train.
  """
  with open(Path(bigbench_dir) / task / "task.json", encoding="utf-8") as f:
    task_json = json.load(f)
  seen, instances = set(), []
  for example in task_json["examples"]:
    if "target_scores" not in example or example["input"] in seen:
      continue
    seen.add(example["input"])
    instances.append(Instance(example["input"], tuple(example["target_scores"])))
  order = np.random.default_rng(seed).permutation(len(instances))
  cut = int(len(instances) * held_out)
  return ([instances[i] for i in order[cut:]], [instances[i] for i in order[:cut]])


@functools.lru_cache(maxsize=None)
def minilm(model_dir: str):
  """One MiniLM embedder per test process (loading and compiling take seconds)."""
  from elm_jax.models import embedders  # pylint: disable=g-import-not-at-top
  return embedders.load_minilm(model_dir)
