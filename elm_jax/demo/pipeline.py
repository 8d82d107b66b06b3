"""The stages of `elm-jax demo`: the whole method on offline BIG-bench data.

The stages run in this order:

- data: fetch BIG-bench and MiniLM, build the vocabulary;
- pretrain: span corruption, giving the shared base;
- experts: one adapter expert per held-in task;
- multitask: full fine-tuning on the same tasks with the experts' total budget;
- library: S samples per expert, embedded by all-MiniLM-L6-v2;
- audit: evaluation instances against the library samples;
- retrieval: Q unlabeled instances per evaluation task vote for an expert;
- matrix: every expert and the multitask model on every evaluation task;
- merged: the uniform merge of the top-k retrieved experts;
- held_in: each expert and the multitask model on the expert's own validation split.

Every stage writes into `run_dir` and finished work is never redone, so a rerun
after a crash or Ctrl-C continues where it stopped and reaches the same numbers.
"""

import dataclasses
import os
from pathlib import Path
import random
from typing import Any, Sequence

from absl import logging
import numpy as np

from elm_jax import file_io
from elm_jax.data import bigbench as bigbench_data
from elm_jax.demo import stages as stages_lib
from elm_jax.models import t5

# A diverse default selection of 12 held-in BIG-bench multiple-choice tasks with
# at least 190 examples each; none of them is one of the 13 evaluation tasks.
DEFAULT_EXPERT_TASKS = (
    "anachronisms",
    "analogical_similarity",
    "causal_judgment",
    "date_understanding",
    "disambiguation_qa",
    "epistemic_reasoning",
    "implicatures",
    "logical_fallacy_detection",
    "navigate",
    "presuppositions_as_nli",
    "social_iqa",
    "sports_understanding",
)

# The 13 BIG-bench tasks on which T0 and the method are evaluated.
DEFAULT_EVAL_TASKS = bigbench_data.EVAL_TASKS

MULTITASK = "multitask"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Everything the demo does; gin/experiments/demo.gin binds the defaults.

  Attributes:
    model_config: the base T5. With the offline default vocabulary its
      vocab_size must cover that vocabulary (checked).
    expert_tasks: held-in BIG-bench task names; one prompt expert each.
    eval_tasks: BIG-bench task names evaluated as unseen tasks.
    initial_checkpoint_path: a Hugging Face, T5X or elm-jax model directory to
      use as the base instead of pretraining one.
    vocabulary_path: a SentencePiece model (local or gs://); None uses the
      offline default vocabulary built from held-in BIG-bench text.
    pretrain_steps: span-corruption steps for the base (0: no pretraining).
    expert_steps: training steps of each prompt expert.
    multitask_steps: steps of the multitask model; None gives it the experts'
      total budget (expert_steps x number of experts).
    batch_size: training batch size (rows) of every run.
    inputs_length, targets_length: training feature lengths.
    pretrain_learning_rate, expert_learning_rate, multitask_learning_rate: peak
      rates (AdamW with linear decay for experts; Adafactor for the rest).
    adapter_reduction_factor: adapter width = d_model // reduction_factor.
    library_samples: S, training instances per expert in the library.
    num_queries: Q, unlabeled instances per evaluation task for retrieval.
    eval_max_examples: at most this many examples per evaluation task.
    held_in_max_examples: at most this many validation examples per expert task.
    eval_batch_size: scoring batch size.
    eval_max_input_length: evaluation inputs longer than this many tokens keep
      their last tokens (the question and answer cue of a BIG-bench prompt).
    merge_top_k: how many retrieved experts the merged expert averages.
    checkpoint_period: training checkpoints every this many steps, so a crash
      loses at most that much work.
    seed: the seed of every random choice (data order, init, sampling).
  """
  model_config: t5.T5Config
  expert_tasks: tuple[str, ...] = DEFAULT_EXPERT_TASKS
  eval_tasks: tuple[str, ...] = DEFAULT_EVAL_TASKS
  initial_checkpoint_path: str | None = None
  vocabulary_path: str | None = None
  pretrain_steps: int = 400
  expert_steps: int = 120
  multitask_steps: int | None = None
  batch_size: int = 16
  inputs_length: int = 128
  targets_length: int = 16
  pretrain_learning_rate: float = 1e-2
  expert_learning_rate: float = 1e-3
  multitask_learning_rate: float = 1e-3
  adapter_reduction_factor: int = 4
  library_samples: int = 100
  num_queries: int = 32
  eval_max_examples: int = 100
  held_in_max_examples: int = 100
  eval_batch_size: int = 16
  eval_max_input_length: int = 512
  merge_top_k: int = 3
  checkpoint_period: int = 50
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "expert_tasks", tuple(self.expert_tasks))
    object.__setattr__(self, "eval_tasks", tuple(self.eval_tasks))
    overlap = sorted(set(self.expert_tasks) & set(self.eval_tasks))
    if overlap:
      raise ValueError(f"Tasks {overlap} are both expert (training) tasks and "
                       "evaluation tasks; evaluation tasks must stay unseen.")
    if not self.expert_tasks:
      raise ValueError("DemoConfig.expert_tasks is empty; name at least one task.")
    if self.merge_top_k < 1:
      raise ValueError(f"merge_top_k must be >= 1, got {self.merge_top_k}.")

  @property
  def total_multitask_steps(self) -> int:
    if self.multitask_steps is not None:
      return self.multitask_steps
    return self.expert_steps * len(self.expert_tasks)


def quick(config: DemoConfig) -> DemoConfig:
  """The `--quick` variant: the same stages with fewer tasks, steps and examples."""
  return dataclasses.replace(
      config,
      expert_tasks=config.expert_tasks[:4],
      pretrain_steps=min(config.pretrain_steps, 60),
      expert_steps=min(config.expert_steps, 30),
      multitask_steps=None,
      library_samples=min(config.library_samples, 40),
      num_queries=min(config.num_queries, 16),
      eval_max_examples=min(config.eval_max_examples, 24),
      held_in_max_examples=min(config.held_in_max_examples, 24))


def train_task(name: str) -> str:
  return f"bigbench_{name}"


def score_task(name: str) -> str:
  return f"bigbench_{name}_score_eval"


def expert_id(name: str) -> str:
  return name


class Demo:
  """Holds the run's shared state (vocabulary, base parameters) between stages."""

  def __init__(self, config: DemoConfig, run_dir: str | os.PathLike[str]):
    self.config = config
    self.run_dir = Path(run_dir)
    self._vocabulary = None
    self._base = None  # (T5Config, params)
    self._embedder = None
    self._template = None
    self._scorers: dict[Any, Any] = {}  # Compiled scorers, shared by every matrix.
    self._records: dict[tuple[str, str, int], list[dict[str, Any]]] = {}

  # Paths.
  @property
  def base_dir(self) -> Path:
    return self.run_dir / "base"

  def expert_model_dir(self, name: str) -> Path:
    return self.run_dir / "experts" / name

  @property
  def multitask_dir(self) -> Path:
    return self.run_dir / MULTITASK

  @property
  def library_dir(self) -> Path:
    return self.run_dir / "library"

  # Shared collaborators, created on first use.
  def vocabulary(self):
    if self._vocabulary is None:
      from elm_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
      self._vocabulary = vocab_lib.get_vocabulary(self.config.vocabulary_path)
    return self._vocabulary

  def register_tasks(self) -> None:
    from elm_jax.tasks import bigbench  # pylint: disable=g-import-not-at-top
    bigbench.register(vocabulary=self.vocabulary())

  def embedder(self):
    if self._embedder is None:
      from elm_jax.models import embedders  # pylint: disable=g-import-not-at-top
      self._embedder = embedders.load_minilm()
    return self._embedder

  def base(self):
    """Returns (config, params) of the shared base model."""
    if self._base is None:
      from elm_jax.checkpoints import loading  # pylint: disable=g-import-not-at-top
      # Importing the trainer's checkpointing registers the loader of its model dirs.
      from elm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top,unused-import
      path = self.config.initial_checkpoint_path or str(self.base_dir)
      config, params = loading.load_model(path, self.config.model_config)
      self._base = (config, params)
    return self._base

  def base_path(self) -> str | None:
    if self.config.initial_checkpoint_path:
      return self.config.initial_checkpoint_path
    return str(self.base_dir) if self.config.pretrain_steps > 0 else None

  # ------------------------------------------------------------------------
  # Training stages.

  def _train(self, *, task: str, model_dir: Path, model_config: t5.T5Config, steps: int,
             trainable: str, optimizer, learning_rate, initial_checkpoint_path: str | None,
             expert_settings):
    from elm_jax.training import checkpointing  # pylint: disable=g-import-not-at-top
    from elm_jax.training import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    from elm_jax.training import trainer  # pylint: disable=g-import-not-at-top
    config = self.config
    return trainer.train(
        model_config=model_config, task_name=task,
        feature_lengths={"inputs": config.inputs_length, "targets": config.targets_length},
        model_dir=str(model_dir), batch_size=config.batch_size, optimizer=optimizer,
        learning_rate=learning_rate, train_steps=steps, trainable=trainable,
        initial_checkpoint_path=initial_checkpoint_path,
        # Synchronous saves: each resume point is on disk before training goes on.
        checkpoint=checkpointing.CheckpointConfig(period=config.checkpoint_period, keep=2,
                                                  async_save=False),
        evaluation=trainer.EvalConfig(period=0, max_batches=4, score_task=None),
        expert=expert_settings,
        logging_config=metrics_lib.LoggingConfig(log_every_secs=30.0, progress_bar=False),
        seed=config.seed)

  def stage_data(self, _) -> dict[str, Any]:
    from elm_jax.data import fetch  # pylint: disable=g-import-not-at-top
    from elm_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    folders = {name: str(fetch.ensure(name)) for name in ("bigbench", "minilm")}
    if self.config.vocabulary_path is None:
      vocab_path = vocab_lib.build_default_vocabulary()
    else:
      vocab_path = self.config.vocabulary_path
    vocabulary = self.vocabulary()
    vocab_lib.check_vocab_matches(vocabulary, self.config.model_config.vocab_size)
    self.register_tasks()
    return {"data": folders, "vocabulary": str(vocab_path),
            "vocab_size": int(vocabulary.vocab_size)}

  def stage_pretrain(self, _) -> dict[str, Any]:
    from elm_jax.tasks import bigbench  # pylint: disable=g-import-not-at-top
    from elm_jax.training import optimizers  # pylint: disable=g-import-not-at-top
    config = self.config
    if config.initial_checkpoint_path:
      return {"base": config.initial_checkpoint_path, "pretrained": False}
    if config.pretrain_steps < 1:
      raise ValueError("pretrain_steps must be >= 1 when no initial_checkpoint_path is "
                       "given: the experts need a shared base checkpoint.")
    self.register_tasks()
    result = self._train(
        task=bigbench.SPAN_CORRUPTION_TASK, model_dir=self.base_dir,
        model_config=config.model_config, steps=config.pretrain_steps, trainable="full",
        optimizer=optimizers.adafactor,
        learning_rate=config.pretrain_learning_rate, initial_checkpoint_path=None,
        expert_settings=None)
    return {"base": str(self.base_dir), "pretrained": True,
            "final_loss": _last_loss(result), "steps": result.final_step}

  def expert_config(self) -> t5.T5Config:
    return dataclasses.replace(
        self.config.model_config,
        adapter=t5.AdapterConfig(reduction_factor=self.config.adapter_reduction_factor,
                                 train_layer_norms=True))

  def stage_experts(self, _) -> dict[str, Any]:
    from elm_jax.training import export  # pylint: disable=g-import-not-at-top
    from elm_jax.training import optimizers  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    config = self.config
    summary = {}
    for name in stages_lib.progress(config.expert_tasks, desc="experts"):
      model_dir = self.expert_model_dir(name)
      expert_dir = model_dir / export.EXPERT_DIR
      if (expert_dir / "expert.json").is_file():
        logging.info("Expert %s exists in %s; skipped.", name, expert_dir)
      else:
        self._train(
            task=train_task(name), model_dir=model_dir, model_config=self.expert_config(),
            steps=config.expert_steps, trainable="adapter", optimizer=optimizers.adamw,
            learning_rate=lambda total_steps: optimizers.linear_decay(
                config.expert_learning_rate, total_steps),
            initial_checkpoint_path=self.base_path(),
            expert_settings=export.ExpertSettings(kind="prompt", expert_id=expert_id(name),
                                                  dataset=name, prompt="bigbench"))
      summary[name] = {"expert_dir": str(expert_dir),
                       "validation": _read_json(expert_dir / "expert.json").get(
                           "validation_metrics", {})}
    return summary

  def stage_multitask(self, _) -> dict[str, Any]:
    import seqio  # pylint: disable=g-import-not-at-top
    from elm_jax.training import export  # pylint: disable=g-import-not-at-top
    from elm_jax.training import optimizers  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    config = self.config
    mixture = self.multitask_mixture()
    if (self.multitask_dir / export.EXPERT_DIR / "expert.json").is_file():
      logging.info("Multitask model exists in %s; skipped.", self.multitask_dir)
      return {"model_dir": str(self.multitask_dir), "mixture": mixture,
              "steps": config.total_multitask_steps}
    del seqio
    result = self._train(
        task=mixture, model_dir=self.multitask_dir, model_config=config.model_config,
        steps=config.total_multitask_steps, trainable="full", optimizer=optimizers.adafactor,
        learning_rate=config.multitask_learning_rate,
        initial_checkpoint_path=self.base_path(),
        expert_settings=export.ExpertSettings(kind="multitask", expert_id=MULTITASK))
    return {"model_dir": str(self.multitask_dir), "mixture": mixture,
            "steps": result.final_step, "final_loss": _last_loss(result)}

  def multitask_mixture(self) -> str:
    """Registers (once) and returns the Mixture of the expert tasks, examples-proportional."""
    import seqio  # pylint: disable=g-import-not-at-top
    name = "demo_multitask_mixture"
    if name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(name)
    seqio.MixtureRegistry.add(
        name, [train_task(t) for t in self.config.expert_tasks],
        default_rate=seqio.mixing_rate_num_examples)
    return name

  # ------------------------------------------------------------------------
  # Library and retrieval.

  def stage_library(self, summaries) -> dict[str, Any]:
    from elm_jax.library import instances as instances_lib  # pylint: disable=g-import-not-at-top
    from elm_jax.library import store  # pylint: disable=g-import-not-at-top
    from elm_jax.models import embedders  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    embedder = self.embedder()
    if not (self.library_dir / store.MANIFEST).is_file():
      store.create(self.library_dir, embedder_kind=embedder.kind,
                   embedder_fingerprint=embedder.fingerprint, dim=embedder.dim,
                   max_length=embedder.max_length, query_max_length=embedders.QUERY_MAX_LENGTH,
                   samples_per_expert=self.config.library_samples, seed=self.config.seed)
    library = store.Library(self.library_dir)
    present = set(library.expert_ids)
    for name in stages_lib.progress(self.config.expert_tasks, desc="library"):
      if expert_id(name) in present:
        continue
      instances = instances_lib.task_instances(score_task(name), "train")
      store.add_expert(self.library_dir, summaries["experts"][name]["expert_dir"], instances,
                       embedder=embedder, expert_id=expert_id(name), source=train_task(name))
    library = store.Library(self.library_dir)
    report = store.verify(self.library_dir)
    if not report.ok:
      raise RuntimeError(f"The library at {self.library_dir} failed verification: {report}")
    return {"library_dir": str(self.library_dir), "experts": list(library.expert_ids),
            "rows": int(sum(len(library.samples(e)) for e in library.expert_ids))}

  def records(self, name: str, split: str, limit: int) -> list[dict[str, Any]]:
    """Scoring records of a BIG-bench task (its subtasks pooled), at most `limit`.

    Each file contributes an equal share, chosen by BIG-bench's fixed split-hash
    sample rather than file order, because several task files list their examples
    grouped by answer.
    """
    from elm_jax.data import fetch  # pylint: disable=g-import-not-at-top
    key = (name, split, limit)
    if key not in self._records:
      index = bigbench_data.load_index()
      entries = sorted((e for e in index.values() if e.task == name), key=lambda e: e.name)
      if not entries:
        raise ValueError(f"No BIG-bench multiple-choice task file for task {name!r}.")
      root = fetch.artifact_dir("bigbench")
      per_file = -(-limit // len(entries))
      records = []
      for entry in entries:
        records.extend(bigbench_data.read_split(
            root / entry.path, split, per_file, cache_dir=bigbench_data.split_cache_dir()))
      self._records[key] = records[:limit]
    return self._records[key]

  def eval_instances(self, name: str):
    """Unlabeled instances (input and choices) of an evaluation task."""
    from elm_jax.library import instances as instances_lib  # pylint: disable=g-import-not-at-top
    return [instances_lib.Instance(r["inputs_pretokenized"], tuple(r["answer_choices"]))
            for r in self.records(name, "all", self.config.eval_max_examples)]

  def stage_audit(self, _) -> dict[str, Any]:
    from elm_jax.library import audit  # pylint: disable=g-import-not-at-top
    from elm_jax.library import store  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    eval_instances = []
    for name in self.config.eval_tasks:
      eval_instances.extend(self.eval_instances(name))
    report = audit.audit(store.Library(self.library_dir), eval_instances,
                         against="bigbench_eval (13 tasks)", embedder=self.embedder())
    file_io.write_json_atomic(self.run_dir / "leakage_audit.json", report, indent=1)
    return report

  def stage_retrieval(self, _) -> dict[str, Any]:
    from elm_jax.library import store  # pylint: disable=g-import-not-at-top
    from elm_jax.retrieval import plots as retrieval_plots  # pylint: disable=g-import-not-at-top
    from elm_jax.retrieval import selector as selector_lib  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    library = store.Library(self.library_dir)
    selector = selector_lib.ExpertSelector(library, embedder=self.embedder())
    decisions, profiles = {}, []
    for name in stages_lib.progress(self.config.eval_tasks, desc="retrieval"):
      queries = selector_lib.sample_queries(self.eval_instances(name), self.config.num_queries,
                                            self.config.seed)
      vectors = selector.embed(queries)
      decision = selector.route(vectors, router="top1_vote", show=3)
      profile = selector.profile(vectors)
      ranking = _rank_experts(decision.votes, profile["mean_top1_similarity"],
                              selector.index.expert_ids)
      record = decision.to_json()
      record["ranking"] = ranking
      record["num_queries"] = len(queries)
      decisions[name] = record
      profiles.append(np.asarray(profile["vote_share"], np.float32))
    heatmap = retrieval_plots.plot_heatmap(
        np.stack(profiles), targets=list(self.config.eval_tasks),
        experts=list(selector.index.expert_ids), output=self.run_dir / "retrieval_heatmap.png")
    return {"decisions": decisions, "heatmap": str(heatmap)}

  # ------------------------------------------------------------------------
  # Evaluation.

  def _expert_model(self, expert_dir: str | Path):
    """Returns (model, params) of an expert folder applied onto the base.

    Every model is built with the experts' adapter config, so one compilation of
    the scorer serves all of them. A model without adapters (the multitask model)
    gets freshly initialized ones, whose zero up-projection makes each adapter the
    identity, so its scores are exactly those of the model without adapters.
    """
    from elm_jax.checkpoints import experts as experts_lib  # pylint: disable=g-import-not-at-top
    _, base_params = self.base()
    _, params = experts_lib.load_expert(expert_dir)
    model_config = self.expert_config()
    template = self._adapter_template()
    full = experts_lib.apply_expert(experts_lib.apply_expert(template, base_params), params)
    return t5.T5(model_config), full

  def _adapter_template(self):
    if self._template is None:
      self._template = t5.init_params(self.expert_config(), jax_random_key(self.config.seed))
    return self._template

  def _model_provider(self, summaries):
    merged_root = self.run_dir / "merged"

    def provide(name: str):
      if name == MULTITASK:
        return self._expert_model(self.multitask_dir / "expert")
      if name.startswith("merged="):
        return self._expert_model(merged_root / name.split("=", 1)[1])
      return self._expert_model(summaries["experts"][name]["expert_dir"])
    return provide

  def _batch_provider(self):
    """Scoring batches of `<task>` (evaluation, split `all`) or `heldin=<task>`."""
    from elm_jax.data import feature_converters  # pylint: disable=g-import-not-at-top
    from elm_jax.evaluation import scorer  # pylint: disable=g-import-not-at-top
    vocabulary = self.vocabulary()

    def provide(task: str):
      held_in = task.startswith("heldin=")
      name = task.split("=", 1)[1] if held_in else task
      if held_in:
        examples = self.records(name, "validation", self.config.held_in_max_examples)
      else:
        examples = self.records(name, "all", self.config.eval_max_examples)
      for position, example in enumerate(examples):
        scorer.check_choices(example, task_name=score_task(name), position=position)
      examples = [self._truncated(example) for example in examples]
      # Coarse buckets: a few more padded positions, far fewer compilations.
      return feature_converters.make_scoring_batches(
          examples, vocabulary, self.config.eval_batch_size,
          enc_buckets=(128, 256, 512), dec_buckets=(64, 256, 1024, 4096),
          choice_buckets=(4, 16, 64, 256), task_name=score_task(name))
    return provide

  def _truncated(self, example: dict[str, Any]) -> dict[str, Any]:
    """The example with tokenized `inputs`: at most eval_max_input_length, EOS last."""
    vocabulary = self.vocabulary()
    tokens = vocabulary.encode(example["inputs_pretokenized"])
    keep = self.config.eval_max_input_length - 1
    return dict(example, inputs=np.asarray(tokens[-keep:] + [vocabulary.eos_id], np.int32))

  def _matrix(self, summaries, *, experts: Sequence[str], tasks: Sequence[str], folder: str):
    from elm_jax.evaluation import matrix  # pylint: disable=g-import-not-at-top
    self.register_tasks()
    cells = matrix.compute_matrix(
        experts=list(experts), tasks=list(tasks), output_dir=self.run_dir / folder,
        model_provider=self._model_provider(summaries), batch_provider=self._batch_provider(),
        settings={"eval_max_examples": self.config.eval_max_examples,
                  "held_in_max_examples": self.config.held_in_max_examples,
                  "eval_max_input_length": self.config.eval_max_input_length,
                  "seed": self.config.seed},
        scorers=self._scorers)
    # Cells hold percentages; the demo's results use fractions in [0, 1].
    return {f"{e}|{t}": {"accuracy": c.accuracy / 100.0, "num_examples": c.num_examples}
            for (e, t), c in sorted(cells.items())}

  def stage_matrix(self, summaries) -> dict[str, Any]:
    experts = [expert_id(t) for t in self.config.expert_tasks] + [MULTITASK]
    return self._matrix(summaries, experts=experts, tasks=self.config.eval_tasks,
                        folder="matrix")

  def stage_merged(self, summaries) -> dict[str, Any]:
    from elm_jax.merging import merge  # pylint: disable=g-import-not-at-top
    decisions = summaries["retrieval"]["decisions"]
    merged_root = self.run_dir / "merged"
    plan: dict[str, list[str]] = {}
    for name in self.config.eval_tasks:
      chosen = decisions[name]["ranking"][:self.config.merge_top_k]
      merged_name = "+".join(sorted(chosen))
      plan.setdefault(merged_name, []).append(name)
      target = merged_root / merged_name
      if not (target / "expert.json").is_file():
        merge.merge_expert_dirs([summaries["experts"][e]["expert_dir"] for e in sorted(chosen)],
                                str(target), expert_id=_safe_id(merged_name))
    cells = {}
    for merged_name, tasks in plan.items():
      cells.update(self._matrix(summaries, experts=[f"merged={merged_name}"], tasks=tasks,
                                folder="merged_matrix"))
    return {"plan": plan, "cells": cells}

  def stage_held_in(self, summaries) -> dict[str, Any]:
    cells = {}
    for name in self.config.expert_tasks:
      cells.update(self._matrix(summaries, experts=[expert_id(name), MULTITASK],
                                tasks=[f"heldin={name}"], folder="held_in_matrix"))
    return cells


def jax_random_key(seed: int):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.random.PRNGKey(seed)


def _safe_id(name: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:120]


def _rank_experts(votes: dict[str, float], similarity: Sequence[float],
                  expert_ids: Sequence[str]) -> list[str]:
  """Orders experts by votes, then mean top-1 similarity, then id."""
  by_id = dict(zip(expert_ids, (float(s) for s in similarity)))
  return sorted(expert_ids, key=lambda e: (-votes.get(e, 0.0), -by_id[e], e))


def _last_loss(result) -> float | None:
  if result is None or not result.losses:
    return None
  return float(result.losses[-1][1])


def _read_json(path: Path) -> dict[str, Any]:
  import json  # pylint: disable=g-import-not-at-top
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def random_expert(eval_task: str, experts: Sequence[str], seed: int) -> str:
  """A uniformly random expert for `eval_task`, fixed by the seed and the task name."""
  rng = random.Random(f"{seed}:{eval_task}")
  return rng.choice(sorted(experts))
