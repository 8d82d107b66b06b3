"""Promptsource templates without promptsource: load, render, and build seqio Tasks.

promptsource 0.2.3 does not install on Python 3.10 or newer, but its templates are
plain YAML and Jinja. This module reads `<dataset>[/<subset>]/templates.yaml` from
the fetched sdist (`elm_jax.data.fetch.ensure("promptsource")`) with a PyYAML safe
loader, and renders templates in a sandboxed Jinja environment that provides
promptsource's filters and rendering rules:

- every `{{ ... }}` value is converted to a string and truncated to 2,048 characters;
- `|||` separates the input from the target, and the `answer_choices` expression
  renders to choices separated by `|||`; each part is stripped of surrounding
  whitespace;
- a `|||` inside an example's own text is protected while rendering and restored
  afterwards;
- hyphens in field names become underscores (`sentence-1` -> `sentence_1`), as P3
  did before applying templates;
- filters: `choice` returns a random element, drawn here from a seeded generator
  so that a rerun renders the same text. `most_frequent` returns the list of
  elements that occur most often, and `highlight` wraps text in an HTML span.

`register_prompted_task` turns raw examples (JSON lines files or a TFDS dataset)
and one template into a training Task and a `_score_eval` Task.
"""

import collections
import dataclasses
import difflib
import functools
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from absl import logging
import jinja2
from jinja2 import sandbox
import seqio
import tensorflow as tf
import yaml

# promptsource truncates every substituted value to this many characters.
TEXT_VALUE_MAX_CHARS = 2048
SEPARATOR = "|||"
# Stands in for a `|||` found inside an example's text while a template renders.
_PIPE_PLACEHOLDER = "\x00elm-jax-pipe\x00"
# Context variable holding the random generator of the `choice` filter.
_RNG_VARIABLE = "_elm_jax_rng"


# ----------------------------------------------------------------------------
# Templates and their YAML files.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplateMetadata:
  """promptsource's `!TemplateMetadata`."""
  original_task: bool | None = None
  choices_in_prompt: bool | None = None
  metrics: tuple[str, ...] = ()
  languages: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Template:
  """One promptsource `!Template`.

  Attributes:
    name: the template's name, unique within its templates.yaml.
    jinja: the template; `|||` separates the input from the target.
    answer_choices: a Jinja expression rendering to `|||`-separated choices, or
      None for open-ended templates.
    id: the template's UUID in promptsource.
    reference: where the template comes from.
    metadata: promptsource's annotations.
  """
  name: str
  jinja: str
  answer_choices: str | None = None
  id: str = ""
  reference: str = ""
  metadata: TemplateMetadata = TemplateMetadata()


class _TemplatesLoader(yaml.SafeLoader):
  """A safe YAML loader that also builds `!Template` and `!TemplateMetadata`."""


def _construct_metadata(loader: yaml.SafeLoader, node: yaml.Node) -> TemplateMetadata:
  fields = loader.construct_mapping(node, deep=True)
  return TemplateMetadata(
      original_task=fields.get("original_task"),
      choices_in_prompt=fields.get("choices_in_prompt"),
      metrics=tuple(fields.get("metrics") or ()),
      languages=tuple(fields.get("languages") or ()))


def _construct_template(loader: yaml.SafeLoader, node: yaml.Node) -> Template:
  fields = loader.construct_mapping(node, deep=True)
  missing = [key for key in ("name", "jinja") if key not in fields]
  if missing:
    raise yaml.constructor.ConstructorError(
        None, None, f"!Template without {', '.join(missing)}", node.start_mark)
  return Template(
      name=str(fields["name"]),
      jinja=str(fields["jinja"]),
      answer_choices=fields.get("answer_choices"),
      id=str(fields.get("id", "")),
      reference=str(fields.get("reference") or ""),
      metadata=fields.get("metadata") or TemplateMetadata())


_TemplatesLoader.add_constructor("!Template", _construct_template)
_TemplatesLoader.add_constructor("!TemplateMetadata", _construct_metadata)


def default_templates_dir() -> Path:
  """Returns the fetched promptsource templates folder, fetching it on first use."""
  from elm_jax.data import fetch  # pylint: disable=g-import-not-at-top
  return fetch.ensure("promptsource")


def _checked_component(value: str, what: str) -> str:
  # Dataset and subset names become path components.
  if not value or value in (".", "..") or "/" in value or "\\" in value or "\x00" in value:
    raise ValueError(f"Invalid promptsource {what} {value!r}: expected one folder name.")
  return value


def templates_path(dataset: str, subset: str | None = None, *,
                   templates_dir: str | os.PathLike[str] | None = None) -> Path:
  """Returns `<templates_dir>/<dataset>[/<subset>]/templates.yaml` (not checked)."""
  root = Path(templates_dir) if templates_dir is not None else default_templates_dir()
  folder = root / _checked_component(dataset, "dataset")
  if subset is not None:
    folder = folder / _checked_component(subset, "subset")
  return folder / "templates.yaml"


@functools.lru_cache(maxsize=512)
def _load_templates_file(path: Path) -> dict[str, Template]:
  with open(path, encoding="utf-8") as f:
    content = yaml.load(f, Loader=_TemplatesLoader)  # A safe loader with two tags.
  if not isinstance(content, dict) or not isinstance(content.get("templates"), dict):
    raise ValueError(f"{path} has no `templates` mapping; is it a promptsource templates.yaml?")
  templates: dict[str, Template] = {}
  for key, template in content["templates"].items():
    if not isinstance(template, Template):
      raise ValueError(f"{path}: entry {key!r} is not a !Template.")
    if template.name in templates:
      raise ValueError(f"{path}: two templates are named {template.name!r}.")
    templates[template.name] = template
  return templates


def load_templates(dataset: str, subset: str | None = None, *,
                   templates_dir: str | os.PathLike[str] | None = None) -> dict[str, Template]:
  """Loads the templates of one dataset (and subset), keyed by template name.

  Raises:
    FileNotFoundError: there is no templates.yaml for this dataset and subset; the
      message lists the nearest dataset folders.
  """
  path = templates_path(dataset, subset, templates_dir=templates_dir)
  if not path.is_file():
    root = path.parent.parent if subset is not None else path.parent
    candidates = []
    if root.parent.is_dir():
      candidates = sorted(p.name for p in root.parent.iterdir() if p.is_dir())
    near = difflib.get_close_matches(path.parent.name, candidates, n=5)
    hint = f" Close folders: {', '.join(near)}." if near else ""
    raise FileNotFoundError(f"No promptsource templates at {path}.{hint}")
  return dict(_load_templates_file(path))


def get_template(dataset: str, subset: str | None, template_name: str, *,
                 templates_dir: str | os.PathLike[str] | None = None) -> Template:
  """Returns one template by name; a missing name raises with the nearest names."""
  templates = load_templates(dataset, subset, templates_dir=templates_dir)
  if template_name in templates:
    return templates[template_name]
  near = difflib.get_close_matches(template_name, list(templates), n=5, cutoff=0.4)
  where = dataset if subset is None else f"{dataset}/{subset}"
  raise KeyError(
      f"No template named {template_name!r} for {where}. Closest names: "
      f"{', '.join(repr(n) for n in near) or 'none'}; all names: {sorted(templates)}.")


def parse_prompt_id(prompt_id: str) -> tuple[str, str | None, str]:
  """Splits `dataset[/subset]@template` into (dataset, subset, template)."""
  path, sep, template = prompt_id.partition("@")
  if not sep or not path or not template:
    raise ValueError(f"Invalid prompt id {prompt_id!r}: expected `dataset[/subset]@template`.")
  dataset, _, subset = path.partition("/")
  return dataset, subset or None, template


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def highlight(text: Any) -> str:
  """Wraps the text in a coloured HTML span, as promptsource's `highlight` filter does."""
  return f"<span style='color: #F08080'>{text}</span>"


def most_frequent(items: Iterable[Any]) -> list[Any] | None:
  """Returns the most frequent items, as promptsource's `most_frequent` filter does.

  The result lists every item that occurs the maximum number of times, in order of first
  occurrence, or None for an empty input.
  """
  counts = collections.Counter(items)
  if not counts:
    return None
  top = max(counts.values())
  return [item for item, count in counts.items() if count == top]


@jinja2.pass_context
def _choice(context: jinja2.runtime.Context, items: Any) -> Any:
  rng = context.get(_RNG_VARIABLE)
  if not isinstance(rng, random.Random):
    rng = random.Random(0)
  return rng.choice(list(items))


def _make_environment() -> sandbox.SandboxedEnvironment:
  # The sandbox rejects access to private attributes and unsafe callables, so a
  # template file cannot reach into Python.
  environment = sandbox.SandboxedEnvironment()
  environment.globals["zip"] = zip
  environment.filters["choice"] = _choice
  environment.filters["most_frequent"] = most_frequent
  environment.filters["highlight"] = highlight
  return environment


_ENVIRONMENT = _make_environment()


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> jinja2.Template:
  return _ENVIRONMENT.from_string(source)


def _truncating(jinja: str) -> str:
  # Pipe every substituted value through `string` and `truncate`, as promptsource does.
  return jinja.replace("}}", f" | string | truncate({TEXT_VALUE_MAX_CHARS}) }}}}")


def _protect(value: Any) -> Any:
  if isinstance(value, str):
    return value.replace(SEPARATOR, _PIPE_PLACEHOLDER)
  if isinstance(value, list | tuple):
    return [_protect(v) for v in value]
  if isinstance(value, dict):
    return {k: _protect(v) for k, v in value.items()}
  return value


def _restore(text: str) -> str:
  return text.replace(_PIPE_PLACEHOLDER, SEPARATOR)


def _prepare_example(example: Mapping[str, Any]) -> dict[str, Any]:
  prepared = {}
  for key, value in example.items():
    prepared[str(key).replace("-", "_")] = _protect(value)
  if "answer_choices" in prepared:
    raise ValueError("An example must not have the field `answer_choices`; the template "
                     "defines it. Rename the field before rendering.")
  return prepared


class Rendered(NamedTuple):
  """A rendered example: input text, target text, and the answer choices or None."""
  inputs: str
  targets: str
  answer_choices: list[str] | None


class TemplateRenderError(ValueError):
  """A template could not produce an input and a target for one example."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


# Exceptions of a template that does not fit an example: a missing field, an
# index past the end of a list, a type it cannot format, a sandbox violation.
_RENDER_ERRORS = (jinja2.TemplateError, TypeError, ValueError, IndexError, KeyError,
                  AttributeError, ZeroDivisionError, OverflowError)


def _render_choices(template: Template, prepared: dict[str, Any],
                    rng: random.Random) -> list[str] | None:
  # The choices keep the `|||` placeholder until the main template has rendered;
  # promptsource restores it first, so a choice containing `|||` splits its target.
  if template.answer_choices is None:
    return None
  text = _compile(template.answer_choices).render(**prepared, **{_RNG_VARIABLE: rng})
  return [choice.strip() for choice in text.split(SEPARATOR)]


def render(template: Template, example: Mapping[str, Any], *,
           rng: random.Random | None = None, truncate: bool = True) -> Rendered:
  """Renders one example, raising TemplateRenderError when the template does not fit.

  Args:
    template: the template.
    example: the raw example, field name to value.
    rng: the generator of the `choice` filter; None uses `random.Random(0)`.
    truncate: truncate each substituted value to TEXT_VALUE_MAX_CHARS characters.
  """
  rng = rng if rng is not None else random.Random(0)
  prepared = _prepare_example(example)
  try:
    choices = _render_choices(template, prepared, rng)
    source = _truncating(template.jinja) if truncate else template.jinja
    text = _compile(source).render(**prepared, answer_choices=choices, **{_RNG_VARIABLE: rng})
  except _RENDER_ERRORS as e:
    raise TemplateRenderError(type(e).__name__,
                              f"template {template.name!r} failed: {type(e).__name__}: {e}") from e
  parts = text.split(SEPARATOR)
  if len(parts) != 2:
    raise TemplateRenderError(
        "separator_count", f"template {template.name!r} rendered {len(parts) - 1} "
        f"`{SEPARATOR}` separators; expected exactly one.")
  inputs, targets = (_restore(part).strip() for part in parts)
  if not inputs:
    raise TemplateRenderError("empty_input", f"template {template.name!r} rendered no input.")
  if not targets:
    raise TemplateRenderError("empty_target", f"template {template.name!r} rendered no target.")
  return Rendered(inputs, targets, None if choices is None else [_restore(c) for c in choices])


def apply_template(template: Template, example: Mapping[str, Any], *,
                   rng: random.Random | None = None, truncate: bool = True) -> Rendered | None:
  """Renders one example; returns None where the template does not fit it.

  P3 drops such examples too: a template that raises (a missing field, an empty
  choice list), renders no `|||`, or renders an empty input or target.
  """
  try:
    return render(template, example, rng=rng, truncate=truncate)
  except TemplateRenderError:
    return None


@dataclasses.dataclass
class RenderCounts:
  """Counts of the examples a template rendered and skipped, by skip reason."""
  rendered: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  @property
  def total_skipped(self) -> int:
    return sum(self.skipped.values())


def example_rng(seed: int, index: int) -> random.Random:
  """The `choice` filter's generator for the example at `index`: fixed by (seed, index)."""
  return random.Random(f"{seed}/{index}")


def render_examples(template: Template, examples: Iterable[Mapping[str, Any]], *,
                    seed: int = 0, counts: RenderCounts | None = None,
                    description: str = "") -> Iterator[dict[str, Any]]:
  """Renders examples, skipping the ones the template does not fit.

  Yields dicts with `inputs`, `targets` (strings), `answer_choices` (a list of
  strings, empty for open-ended templates) and `idx` (the example's position in
  `examples`). When the input is exhausted, logs how many examples were skipped
  and why; `counts`, when given, receives the same numbers.
  """
  counts = counts if counts is not None else RenderCounts()
  for index, example in enumerate(examples):
    try:
      rendered = render(template, example, rng=example_rng(seed, index))
    except TemplateRenderError as e:
      counts.skipped[e.reason] += 1
      continue
    counts.rendered += 1
    yield {"inputs": rendered.inputs, "targets": rendered.targets,
           "answer_choices": list(rendered.answer_choices or ()), "idx": index}
  if counts.total_skipped:
    logging.warning("%s template %r skipped %d of %d examples it could not render: %s.",
                    description or "Prompted", template.name, counts.total_skipped,
                    counts.total_skipped + counts.rendered, dict(counts.skipped))


# ----------------------------------------------------------------------------
# Raw example sources.
# ----------------------------------------------------------------------------


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
  """Yields the JSON objects of a JSON lines file; blank lines are skipped."""
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        example = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {line_number}: invalid JSON ({e.msg}).") from e
      if not isinstance(example, dict):
        raise ValueError(f"{path}, line {line_number}: expected a JSON object, got "
                         f"{type(example).__name__}.")
      yield example


def _to_python(value: Any) -> Any:
  # TFDS yields numpy values and bytes; templates expect str, int, float and lists.
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _to_python(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return _to_python(value.tolist())
  if isinstance(value, list):
    return [_to_python(v) for v in value]
  return value


def read_tfds(name: str, split: str, *, data_dir: str | None = None) -> Iterator[dict[str, Any]]:
  """Yields the examples of a prepared TFDS split as Python values (bytes decoded as UTF-8).

  Nothing is downloaded: an unprepared dataset raises TFDS's error, which names
  the data folder it searched.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  dataset = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False, download=False)
  for example in tfds.as_numpy(dataset):
    yield _to_python(example)


# ----------------------------------------------------------------------------
# seqio Tasks.
# ----------------------------------------------------------------------------

SCORE_EVAL_SUFFIX = "_score_eval"

# Features of the rendered, not yet tokenized examples.
_RENDERED_SIGNATURE = {
    "inputs": tf.TensorSpec([], tf.string),
    "targets": tf.TensorSpec([], tf.string),
    "answer_choices": tf.TensorSpec([None], tf.string),
    "idx": tf.TensorSpec([], tf.int32),
}


def prompted_dataset(examples_fn: Callable[[str], Iterable[Mapping[str, Any]]],
                     template: Template, *, split: str, seed: int = 0,
                     description: str = "") -> tf.data.Dataset:
  """Renders `examples_fn(split)` with the template into a dataset of strings."""

  def generate():
    yield from render_examples(template, examples_fn(split), seed=seed,
                               description=f"{description} [{split}]")

  return tf.data.Dataset.from_generator(generate, output_signature=_RENDERED_SIGNATURE)


def _dataset_fn(split: str, shuffle_files: bool, seed: int | None = None, *,
                examples_fn: Callable[[str], Iterable[Mapping[str, Any]]],
                template: Template, render_seed: int, description: str) -> tf.data.Dataset:
  del shuffle_files, seed  # A generator has no files to shuffle; seqio shuffles examples.
  return prompted_dataset(examples_fn, template, split=split, seed=render_seed,
                          description=description)


def rank_classification_features(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Adds `is_correct` and makes `targets` the first correct choice.

  A choice is correct when it equals the stripped target text. Examples whose
  target matches no choice (an unlabeled example, or a target outside the
  choices) cannot be scored and are dropped.
  """

  def correct(example):
    return tf.equal(example["answer_choices"], tf.strings.strip(example["targets"]))

  def add_features(example):
    is_correct = correct(example)
    first = tf.argmax(tf.cast(is_correct, tf.int32), output_type=tf.int32)
    return {**example, "is_correct": is_correct,
            "targets": tf.gather(example["answer_choices"], first)}

  dataset = dataset.filter(lambda example: tf.reduce_any(correct(example)))
  return dataset.map(add_features, num_parallel_calls=tf.data.AUTOTUNE)


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
  """`inputs` and `targets`, both with EOS, as every Task of the project has them."""
  return {
      "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
  }


def resolve_vocabulary(vocabulary: seqio.Vocabulary | None) -> seqio.Vocabulary:
  """Returns `vocabulary`, or the project's default vocabulary when it is None.

  The default is not checked on disk here: a missing model file is reported when
  a dataset is first tokenized, so Tasks can be registered before it is built.
  """
  if vocabulary is not None:
    return vocabulary
  from elm_jax.data import vocab  # pylint: disable=g-import-not-at-top
  return vocab.get_vocabulary(check_exists=False)


def _replace_task(name: str, **kwargs) -> seqio.Task:
  seqio.TaskRegistry.remove(name)
  return seqio.TaskRegistry.add(name, **kwargs)


def register_prompted_task(
    name: str, *,
    dataset: str | None = None,
    subset: str | None = None,
    template_name: str | None = None,
    template: Template | None = None,
    source_jsonl: str | os.PathLike[str] | Mapping[str, str | os.PathLike[str]] | None = None,
    tfds_name: str | None = None,
    tfds_splits: Mapping[str, str] | None = None,
    tfds_data_dir: str | None = None,
    vocabulary: seqio.Vocabulary | None = None,
    score_eval: bool = True,
    templates_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[str, ...]:
  """Registers a Task (and its `_score_eval` Task) from raw examples and a template.

  The raw examples come from JSON lines files or from TFDS, never from P3. The
  Task `name` yields tokenized `inputs` and `targets` plus `inputs_pretokenized`,
  `targets_pretokenized`, `answer_choices` and `idx`. The Task
  `<name>_score_eval` yields the scoring features: `answer_choices`,
  `is_correct`, `idx`, and `targets` set to the first correct choice.
  Registering a name again replaces the Task.

  Args:
    name: the Task name (letters, digits, `_`, `.`, `:`).
    dataset: the promptsource dataset folder, e.g. `super_glue`.
    subset: the promptsource subset folder, e.g. `rte`, or None.
    template_name: the template's name in that templates.yaml.
    template: a Template to use instead of `dataset`, `subset` and
      `template_name`.
    source_jsonl: a JSON lines file (registered as split `train`), or a mapping
      from split name to file. Each line is one raw example shaped like the
      dataset's Hugging Face examples.
    tfds_name: a TFDS name such as `super_glue/rte:1.0.2`, used instead of
      `source_jsonl`; the data must already be prepared in `tfds_data_dir`.
    tfds_splits: Task split to TFDS split; defaults to train and validation.
    tfds_data_dir: the TFDS data folder; None uses TFDS's default.
    vocabulary: the vocabulary; None uses `elm_jax.data.vocab.get_vocabulary()`.
    score_eval: also register `<name>_score_eval`; needs a template with
      answer_choices.
    templates_dir: the promptsource templates folder; None uses the fetched one.
    seed: seeds the `choice` filter of each example.

  Returns:
    The registered Task names.
  """
  if not re.fullmatch(r"[\w.:]+", name):
    raise ValueError(f"Invalid Task name {name!r}: use letters, digits, `_`, `.` and `:`.")
  if (source_jsonl is None) == (tfds_name is None):
    raise ValueError(f"Task {name!r}: pass exactly one of source_jsonl and tfds_name.")
  if template is None:
    if dataset is None or template_name is None:
      raise ValueError(f"Task {name!r}: pass `template`, or `dataset` and `template_name`.")
    template = get_template(dataset, subset, template_name, templates_dir=templates_dir)
  if score_eval and template.answer_choices is None:
    raise ValueError(
        f"Template {template.name!r} has no answer_choices, so "
        f"{name + SCORE_EVAL_SUFFIX!r} cannot be scored. Pass score_eval=False.")

  if source_jsonl is not None:
    files = (dict(source_jsonl) if isinstance(source_jsonl, Mapping)
             else {"train": source_jsonl})
    files = {split: os.fspath(path) for split, path in files.items()}
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
      raise FileNotFoundError(f"Task {name!r}: JSON lines file(s) not found: {missing}.")
    examples_fn = lambda split: read_jsonl(files[split])
    splits = tuple(files)
  else:
    split_map = dict(tfds_splits or {"train": "train", "validation": "validation"})
    examples_fn = lambda split: read_tfds(tfds_name, split_map[split], data_dir=tfds_data_dir)
    splits = tuple(split_map)

  source = seqio.FunctionDataSource(
      functools.partial(_dataset_fn, examples_fn=examples_fn, template=template,
                        render_seed=seed, description=name),
      splits=splits)
  features = output_features(resolve_vocabulary(vocabulary))
  tokenize = [seqio.preprocessors.tokenize, seqio.CacheDatasetPlaceholder(),
              seqio.preprocessors.append_eos_after_trim]
  _replace_task(name, source=source, preprocessors=tokenize, output_features=features)
  names = (name,)
  if score_eval:
    _replace_task(name + SCORE_EVAL_SUFFIX, source=source,
                  preprocessors=[rank_classification_features, *tokenize],
                  output_features=features)
    names += (name + SCORE_EVAL_SUFFIX,)
  return names
