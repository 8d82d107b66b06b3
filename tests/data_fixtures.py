"""Shared data fixtures: a cache linked to the real BIG-bench files, a small vocabulary.

Import the fixtures into a test module with
`from data_fixtures import linked_cache, small_vocab  # pylint: disable=unused-import`
(pytest puts tests/ on sys.path and finds fixtures by name in the module namespace).
"""

import shutil
from pathlib import Path

import pytest

from elm_jax.data import bigbench
from elm_jax.data import fetch
from elm_jax.data import vocab as vocab_lib

# Small English held-in task files: the test vocabulary trains in seconds on them.
SMALL_VOCAB_TASKS = (
    "anachronisms", "analogical_similarity", "causal_judgment", "date_understanding",
    "disambiguation_qa", "fantasy_reasoning", "general_knowledge", "crass_ai",
)
SMALL_VOCAB_SIZE = 397  # Odd on purpose; 497 ids with the 100 sentinels.


def make_linked_cache(root: Path) -> Path:
  """Creates a cache root whose `bigbench` is the fetched artifact, with its index.

  Writes (vocabularies, indexes) then land in `root`, never in the user cache.
  """
  source = fetch.ensure("bigbench")
  bigbench.load_index()  # Builds the index in the user cache if it is missing.
  root.mkdir(parents=True, exist_ok=True)
  (root / "bigbench").symlink_to(source, target_is_directory=True)
  index = bigbench.index_path()
  (root / "derived").mkdir(exist_ok=True)
  shutil.copyfile(index, root / "derived" / index.name)
  return root


def build_small_vocab(cache: Path) -> Path:
  return vocab_lib.build_default_vocabulary(
      cache, SMALL_VOCAB_SIZE, examples_per_task=100, task_names=SMALL_VOCAB_TASKS)


@pytest.fixture(scope="session")
def linked_cache(tmp_path_factory) -> Path:
  return make_linked_cache(tmp_path_factory.mktemp("linked_cache"))


@pytest.fixture(scope="session")
def small_vocab(linked_cache):
  """A 397-piece default-style vocabulary (497 ids with sentinels), built once."""
  build_small_vocab(linked_cache)
  return vocab_lib.get_vocabulary(cache=linked_cache, vocab_size=SMALL_VOCAB_SIZE)
