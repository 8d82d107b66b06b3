"""Gin flags for the entry points, in T5X's style.

An entry point accepts any number of `--gin_file=FILE` (parsed in order) and
`--gin.KEY=VALUE` overrides (applied after every file), for example

  elm-jax train --gin_file=experiments/prompt_expert.gin \
      --gin.MODEL_DIR=/tmp/pe --gin.trainer.train.train_steps=100

Gin files are looked up in this order: the current directory, each
`--gin_search_path`, the entries of `$ELM_JAX_GIN_PATH` (separated by
`os.pathsep`), the repository's `gin/` folder and the repository root. So
`experiments/prompt_expert.gin` and `gin/experiments/prompt_expert.gin` name the
same file. `include` statements inside gin files search the same places.

Configuration errors (a misspelled configurable or parameter, a `%gin.REQUIRED`
macro left unset, a missing file) raise `GinConfigError` with the nearest valid
names and the flag to set.
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import os
from pathlib import Path
import re
import sys
from typing import Any, Callable, Iterable, Sequence

from absl import logging
import gin

import elm_jax

from elm_jax import file_io

SEARCH_PATH_ENV = "ELM_JAX_GIN_PATH"

# The repository root when elm_jax is installed editable (as in development and
# in the TPU scripts). A wheel install has no gin/ folder next to the package, so
# these two search paths are then skipped.
_REPO_ROOT = Path(elm_jax.__file__).resolve().parents[1]
REPO_GIN_DIR = _REPO_ROOT / "gin"

# Values after `--gin.KEY=` that are passed to gin unchanged even when they are
# not Python literals: configurable references, macros and containers.
_GIN_EXPRESSION_STARTS = ("@", "%", "[", "(", "{", "'", '"')


class GinConfigError(ValueError):
  """An invalid gin configuration: unknown name, unset required value, bad file."""


# ---------------------------------------------------------------------------
# Flags.


def add_gin_arguments(parser: argparse.ArgumentParser) -> None:
  """Add `--gin_file`, `--gin_search_path` and `--gin_bindings` to `parser`.

  `--gin.KEY=VALUE` flags cannot be declared to argparse; `split_gin_bindings`
  removes them from argv before `parser.parse_args` runs.
  """
  group = parser.add_argument_group(
      "gin", "Configuration: --gin_file FILE (repeatable, parsed in order) and "
      "--gin.KEY=VALUE overrides, e.g. --gin.MODEL_DIR=/tmp/run or "
      "--gin.trainer.train.train_steps=100.")
  group.add_argument(
      "--gin_file", action="append", default=[], metavar="FILE",
      help="a gin file, absolute or relative to a search path; repeatable")
  group.add_argument(
      "--gin_search_path", "--gin_search_paths", dest="gin_search_path", action="append",
      default=[], metavar="DIR",
      help=f"a folder to search for gin files and includes; repeatable or comma-separated "
      f"(also ${SEARCH_PATH_ENV}, then {REPO_GIN_DIR})")
  group.add_argument(
      "--gin_bindings", action="append", default=[], metavar="BINDING",
      help="a gin binding `KEY = VALUE`, applied after all files; repeatable")


def format_binding(key: str, value: str) -> str:
  """Return the gin binding `key = value` for a `--gin.KEY=VALUE` flag.

  A value that is a Python literal (`100`, `1e-4`, `True`, `'adam'`) or a gin
  expression (starting with `@`, `%`, a bracket or a quote) is used unchanged.
  Any other value is taken as a string, so `--gin.MODEL_DIR=/tmp/run` works
  without shell-escaped quotes.
  """
  value = value.strip()
  if not key or not re.fullmatch(r"[A-Za-z0-9_./]+", key):
    raise GinConfigError(
        f"Invalid gin flag key {key!r}: expected --gin.NAME=VALUE with NAME a "
        "macro or a configurable.parameter, e.g. --gin.MODEL_DIR=/tmp/run.")
  if not value.startswith(_GIN_EXPRESSION_STARTS):
    try:
      ast.literal_eval(value)
    except (ValueError, SyntaxError):
      value = repr(value)
  return f"{key} = {value}"


def split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Split `--gin.KEY=VALUE` and `--gin.KEY VALUE` flags out of `argv`.

  Returns:
    `(bindings, remaining_argv)`: gin binding strings `KEY = VALUE` in the order
    given, and every other argument, unchanged, for argparse.
  """
  bindings, remaining = [], []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    if arg.startswith("--gin."):
      flag = arg[len("--gin."):]
      if "=" in flag:
        key, value = flag.split("=", 1)
      elif i + 1 < len(args):
        key, value = flag, args[i + 1]
        i += 1
      else:
        raise GinConfigError(
            f"Flag {arg} has no value: write {arg}=VALUE or {arg} VALUE.")
      bindings.append(format_binding(key, value))
    else:
      remaining.append(arg)
    i += 1
  return bindings, remaining


# ---------------------------------------------------------------------------
# Search paths.


def default_search_paths() -> list[str]:
  """Return `$ELM_JAX_GIN_PATH` entries, the repo `gin/` folder and the repo root."""
  paths = [p for p in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep) if p]
  if REPO_GIN_DIR.is_dir():
    paths += [str(REPO_GIN_DIR), str(_REPO_ROOT)]
  return paths


def _all_search_paths(search_paths: Iterable[str]) -> list[str]:
  paths = []
  for path in [*search_paths, *default_search_paths()]:
    if path not in paths:
      paths.append(str(path))
  return paths


def resolve_gin_file(gin_file: str, search_paths: Iterable[str] = ()) -> str:
  """Return the path of `gin_file`, absolute or found in a search path.

  Raises:
    GinConfigError: the file is in no search path. The message lists the
      paths searched and the nearest gin files in them.
  """
  if os.path.isabs(gin_file):
    if os.path.isfile(gin_file):
      return gin_file
    paths = []
  else:
    paths = ["", *_all_search_paths(search_paths)]
    for prefix in paths:
      candidate = os.path.join(prefix, gin_file)
      if os.path.isfile(candidate):
        return os.path.abspath(candidate)

  known = []
  for prefix in paths[1:]:
    known += [str(p.relative_to(prefix)) for p in Path(prefix).rglob("*.gin")]
  close = difflib.get_close_matches(gin_file, sorted(set(known)), n=5, cutoff=0.5)
  hint = f" Nearest gin files: {', '.join(close)}." if close else ""
  searched = ", ".join(p or "." for p in paths) or "(absolute path)"
  raise GinConfigError(
      f"Gin file not found: {gin_file}. Searched: {searched}.{hint} Pass an "
      "existing file or add its folder with --gin_search_path.")


# ---------------------------------------------------------------------------
# Parsing with better errors.

# Messages of gin-config 0.5.0 that `_explain` recognizes.
_UNKNOWN_CONFIGURABLE = re.compile(r"No configurable matching (?:reference )?'@?([^'(]+)")
_UNKNOWN_PARAMETER = re.compile(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'")
_UNRESOLVED_ATTRIBUTE = re.compile(r"Couldn't resolve selector (\S+); (.*) has no attribute (\w+)")
_UNIMPORTED_SYMBOL = re.compile(r"'(\w+)' was not provided by an import statement")


def _registered_selectors() -> list[str]:
  # NOTE: gin-config 0.5.0 has no public listing of its registry.
  registry = gin.config._REGISTRY  # pylint: disable=protected-access
  return sorted(s for s, _ in registry.items() if not s.startswith("gin."))


def _parameter_names(fn: Callable[..., Any]) -> list[str]:
  if inspect.isclass(fn):
    if dataclasses.is_dataclass(fn):
      return [f.name for f in dataclasses.fields(fn) if f.init]
    fn = fn.__init__
  fn = inspect.unwrap(fn)
  try:
    parameters = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return []
  return [
      p.name for p in parameters
      if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
  ]


def _suggest(name: str, candidates: Iterable[str], kind: str) -> str:
  candidates = sorted(set(candidates))
  close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
  if not close:
    # Compare last components too, so `optimizers.adamx` finds
    # `elm_jax.training.optimizers.adamw`.
    by_tail = {c.rsplit(".", 1)[-1]: c for c in candidates}
    tails = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(by_tail), n=5, cutoff=0.6)
    close = [by_tail[t] for t in tails]
  if close:
    return f"\nNearest {kind}: {', '.join(close)}."
  if candidates and len(candidates) <= 30:
    return f"\nValid {kind}: {', '.join(candidates)}."
  return ""


def _explain(message: str) -> str:
  """Return hints (nearest names, what to do) for a gin error message."""
  if m := _UNKNOWN_PARAMETER.search(message):
    selector, parameter = m.groups()
    configurable = gin.config._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    names = _parameter_names(configurable.wrapped) if configurable else []
    return _suggest(parameter, names, f"parameters of {selector}")
  if m := _UNRESOLVED_ATTRIBUTE.search(message):
    selector, _, attribute = m.groups()
    module_path = selector.rsplit(".", 1)[0]
    names = re.findall(r"'([\w.]+)'", m.group(2))
    module = sys.modules.get(names[0]) if names else None
    candidates = [n for n in dir(module) if not n.startswith("_")] if module else []
    return _suggest(attribute, candidates, f"names in {module_path}")
  if m := _UNKNOWN_CONFIGURABLE.search(message):
    return _suggest(m.group(1), _registered_selectors(), "configurables") + (
        "\nA gin file names a configurable through its module: `from __gin__ import "
        "dynamic_registration`, `from elm_jax.training import optimizers`, then "
        "`optimizers.adamw.learning_rate = ...`.")
  if m := _UNIMPORTED_SYMBOL.search(message):
    return (f"\nImport the module `{m.group(1)}` in the gin file, after `from __gin__ "
            f"import dynamic_registration`: `import {m.group(1)}` or "
            f"`from PACKAGE import {m.group(1)}`.")
  if "No module named" in message:
    return ("\nGin imports modules, not functions: import the module and name the "
            "function through it (`from elm_jax.training import optimizers`, then "
            "`optimizers.adamw.learning_rate = ...`).")
  return ""


def _unset_required() -> list[str]:
  """Return the binding keys still set to `%gin.REQUIRED`, macros by name."""
  # NOTE: reads gin-config 0.5.0 internals, as gin's own finalize hook does, so
  # that one error lists every unset value. If these internals change, gin's
  # hook still reports the first one.
  config = getattr(gin.config, "_CONFIG", {})
  unset = []
  for (scope, selector), parameters in config.items():
    for name, value in parameters.items():
      if not isinstance(value, gin.config.ConfigurableReference):
        continue
      if value.configurable.wrapped != gin.config._retrieve_constant:  # pylint: disable=protected-access
        continue
      if value.scoped_configurable_fn() is not gin.REQUIRED:
        continue
      if selector == "gin.macro":
        unset.append(scope)
      else:
        unset.append(f"{scope + '/' if scope else ''}{selector}.{name}")
  return sorted(unset)


def _raise_gin_error(error: Exception) -> None:
  message = str(error)
  raise GinConfigError(message + _explain(message)) from error


def parse_gin(gin_files: Sequence[str] = (),
              bindings: Sequence[str] = (),
              *,
              search_paths: Iterable[str] = (),
              finalize: bool = True,
              skip_unknown: bool = False) -> None:
  """Parse gin files (in order), then bindings, into gin's global config.

  Args:
    gin_files: file names, absolute or relative to a search path.
    bindings: binding strings `KEY = VALUE`, applied after the files.
    search_paths: extra folders searched before the defaults.
    finalize: lock the config and check that no `%gin.REQUIRED` is left.
    skip_unknown: ignore bindings of configurables that are not registered.

  Raises:
    GinConfigError: a file is missing, a name is unknown (the message lists the
      nearest valid names) or a required macro or parameter was not set (the
      message names the `--gin.NAME=` flag that sets it).
  """
  search_paths = _all_search_paths(search_paths)
  for path in search_paths:
    # Needed for `include` statements inside gin files.
    if path not in gin.config._LOCATION_PREFIXES:  # pylint: disable=protected-access
      gin.add_config_file_search_path(path)
  resolved = [resolve_gin_file(f, search_paths) for f in gin_files]
  logging.info("Parsing gin files %s with %d bindings.", resolved, len(bindings))

  try:
    gin.parse_config_files_and_bindings(
        resolved, list(bindings), finalize_config=False, skip_unknown=skip_unknown)
  except (ValueError, AttributeError, NameError, ImportError) as e:
    _raise_gin_error(e)
  except IOError as e:  # An `include` of a missing file.
    raise GinConfigError(f"{e}\nAdd its folder with --gin_search_path.") from e

  if not finalize:
    return
  unset = _unset_required()
  if unset:
    flags = ", ".join(f"--gin.{key}=VALUE" for key in unset)
    raise GinConfigError(
        f"Required gin values not set (marked %gin.REQUIRED): {', '.join(unset)}. "
        f"Set them with {flags} or bind them in a gin file.")
  try:
    gin.finalize()
  except (ValueError, AttributeError, NameError) as e:
    _raise_gin_error(e)


def configured(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Return gin's configured version of `fn`, or `fn` if no gin file binds it.

  With dynamic registration a function becomes a configurable only once a gin
  file names it; an unregistered function has no bindings to apply.
  """
  try:
    return gin.get_configurable(fn)
  except (ValueError, KeyError):
    return fn


# ---------------------------------------------------------------------------
# Writing the resolved config.


def write_config(model_dir: str | os.PathLike[str],
                 *,
                 operative: bool = False,
                 filename: str = "config.gin") -> Path:
  """Write the gin config into `model_dir/filename` atomically.

  Args:
    model_dir: a local folder, created if missing.
    operative: write `gin.operative_config_str()` (the values that configured
      functions actually used, known after they ran) instead of
      `gin.config_str()` (everything parsed).
    filename: the file name inside `model_dir`.

  Returns:
    The written path.
  """
  # NOTE: local paths only; a gs:// model directory needs tf.io.gfile here.
  text = gin.operative_config_str() if operative else gin.config_str()
  path = Path(model_dir) / filename
  file_io.write_text_atomic(path, text)
  logging.info("Wrote the gin config to %s.", path)
  return path


def log_config(writer: Any, *, step: int = 0, operative: bool = False) -> None:
  """Write the gin config as Markdown text through a clu metric writer.

  Args:
    writer: a `clu.metric_writers.MetricWriter` (for TensorBoard text).
    step: the step to record it at.
    operative: log the operative config instead of the parsed one.
  """
  text = gin.operative_config_str() if operative else gin.config_str()
  key = "gin/operative_config" if operative else "gin/config"
  writer.write_texts(step, {key: gin.markdown(text)})
  writer.flush()


# ---------------------------------------------------------------------------
# Entry points.


def parse_flags(argv: Sequence[str],
                description: str,
                *,
                add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                prog: str | None = None) -> argparse.Namespace:
  """Parse argv (without the program name) and the gin config it names."""
  parser = argparse.ArgumentParser(prog=prog, description=description)
  add_gin_arguments(parser)
  if add_arguments is not None:
    add_arguments(parser)
  bindings, remaining = split_gin_bindings(argv)
  args = parser.parse_args(remaining)
  args.gin_search_path = [p for entry in args.gin_search_path for p in entry.split(",") if p]
  parse_gin(args.gin_file, [*args.gin_bindings, *bindings], search_paths=args.gin_search_path)
  return args


def run(main_fn: Callable[[argparse.Namespace], int | None],
        argv: Sequence[str] | None,
        description: str,
        *,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        prog: str | None = None) -> int:
  """Parse flags and gin, then call `main_fn(args)`; return an exit status.

  A configuration error prints its message (no traceback) and returns 2, as
  argparse does for bad flags. `main_fn` errors propagate.

  Args:
    main_fn: the entry point's body; its return value (None means 0) is the
      exit status.
    argv: arguments without the program name; None reads `sys.argv[1:]`.
    description: the `--help` text.
    add_arguments: adds the entry point's own flags to the parser.
    prog: the program name shown in usage, e.g. "elm-jax train".
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = parse_flags(argv, description, add_arguments=add_arguments, prog=prog)
  except GinConfigError as e:
    print(f"{prog or 'elm-jax'}: gin configuration error: {e}", file=sys.stderr)
    return 2
  return int(main_fn(args) or 0)
