"""The on-disk Expert Library: adding, removing, checksums, atomicity, audit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import library_fixtures
from elm_jax.library import audit as audit_lib
from elm_jax.library import cli
from elm_jax.library import instances as instances_lib
from elm_jax.library import store
from elm_jax.library.instances import Instance
from elm_jax.models import embedders

S = 12


def _instances(prefix: str, count: int = 30) -> list[Instance]:
  return [Instance(f"{prefix} question number {i}: what happens next?", ("yes", "no"))
          for i in range(count)]


def _create(root: Path, embedder, dtype="float32") -> Path:
  return store.create(root, embedder_kind=embedder.kind,
                      embedder_fingerprint=embedder.fingerprint, dim=embedder.dim,
                      max_length=embedder.max_length, query_max_length=512,
                      samples_per_expert=S, seed=3, dtype=dtype)


@pytest.fixture
def hashing():
  return embedders.HashingEmbedder(dim=64)


@pytest.fixture
def library(tmp_path, hashing):
  root = _create(tmp_path / "lib", hashing)
  for name in ("alpha", "beta"):
    expert = library_fixtures.write_expert(tmp_path / "experts" / name, name, f"task_{name}")
    store.add_expert(root, expert, _instances(name), embedder=hashing)
  return root


def test_add_appends_rows(library, hashing):
  lib = store.Library(library)
  assert lib.expert_ids == ("alpha", "beta")
  assert lib.generation == 2
  assert lib.entry("beta")["rows"] == [S, 2 * S]
  index = lib.load_index(embedder=hashing)
  assert index.embeddings.shape == (2 * S, 64)
  assert index.row_expert.tolist() == [0] * S + [1] * S
  samples = lib.load_samples()
  expected = hashing.embed([instances_lib.format_text(x) for x in samples])
  np.testing.assert_allclose(index.embeddings, expected, atol=1e-6)


def test_add_does_not_rewrite_existing_files(library, tmp_path, hashing):
  before = {p: p.stat().st_mtime_ns for p in (library / "embeddings").iterdir()}
  expert = library_fixtures.write_expert(tmp_path / "experts" / "gamma", "gamma")
  store.add_expert(library, expert, _instances("gamma"), embedder=hashing)
  for path, mtime in before.items():
    assert path.stat().st_mtime_ns == mtime
  assert store.Library(library).entry("gamma")["rows"] == [2 * S, 3 * S]


def test_sampling_is_seeded_and_sized(library):
  samples = store.Library(library).samples("alpha")
  chosen = instances_lib.sample_indices(30, S, 3)
  assert [x.input for x in samples] == [_instances("alpha")[i].input for i in chosen]
  assert len(samples) == S


def test_remove_reassigns_rows_and_deletes_files(library, hashing):
  store.remove_expert(library, "alpha")
  lib = store.Library(library)
  assert lib.expert_ids == ("beta",)
  assert lib.entry("beta")["rows"] == [0, S]
  assert not (library / "experts" / "alpha").exists()
  assert not (library / "embeddings" / "alpha.npy").exists()
  assert store.verify(library).ok
  assert lib.load_index(embedder=hashing).embeddings.shape == (S, 64)


def test_duplicate_id_rejected(library, tmp_path, hashing):
  expert = library_fixtures.write_expert(tmp_path / "dup", "alpha")
  with pytest.raises(store.LibraryError, match="already has expert 'alpha'"):
    store.add_expert(library, expert, _instances("x"), embedder=hashing)


def test_float16_library(tmp_path, hashing):
  root = _create(tmp_path / "lib16", hashing, dtype="float16")
  expert = library_fixtures.write_expert(tmp_path / "e", "e")
  store.add_expert(root, expert, _instances("e"), embedder=hashing)
  assert np.load(root / "embeddings" / "e.npy").dtype == np.float16
  index = store.Library(root).load_index(embedder=hashing)
  assert index.embeddings.dtype == np.float32
  assert store.verify(root).ok


def test_corrupted_embeddings_detected_and_refused(library, hashing):
  path = library / "embeddings" / "beta.npy"
  data = bytearray(path.read_bytes())
  data[-5] ^= 0xFF
  path.write_bytes(bytes(data))
  report = store.verify(library)
  assert not report.ok
  assert any("beta.npy" in e for e in report.errors)
  with pytest.raises(store.CorruptFileError, match="beta.npy is corrupted"):
    store.Library(library).load_index(embedder=hashing)


def test_corrupted_parameters_refused(library):
  path = library / "experts" / "alpha" / "params.safetensors"
  path.write_bytes(path.read_bytes()[:-1] + b"\x00")
  assert not store.verify(library).ok
  with pytest.raises(store.CorruptFileError, match="params.safetensors"):
    store.Library(library).expert_dir("alpha")


@pytest.mark.parametrize("bad", ["../evil", "a/b", "..", ".hidden", "", "x" * 129, "a..b",
                                 "/abs"])
def test_path_escaping_ids_rejected(library, tmp_path, hashing, bad):
  expert = library_fixtures.write_expert(tmp_path / "escape", "fine")
  with pytest.raises(instances_lib.InvalidIdentifierError, match="Invalid expert id"):
    store.add_expert(library, expert, _instances("x"), embedder=hashing, expert_id=bad)
  with pytest.raises(instances_lib.InvalidIdentifierError):
    store.remove_expert(library, bad)
  assert not (tmp_path / "evil").exists()
  assert store.Library(library).expert_ids == ("alpha", "beta")


def test_id_from_expert_json_is_validated(library, tmp_path, hashing):
  expert = library_fixtures.write_expert(tmp_path / "escape", "../../outside")
  with pytest.raises(instances_lib.InvalidIdentifierError, match="outside"):
    store.add_expert(library, expert, _instances("x"), embedder=hashing)


def test_other_embedding_model_rejected(library, minilm_dir):
  minilm = library_fixtures.minilm(str(minilm_dir))
  with pytest.raises(store.EmbedderMismatchError) as error:
    store.Library(library).load_index(embedder=minilm)
  message = str(error.value)
  assert "'hashing'" in message
  assert "'minilm'" in message


def test_other_embedder_settings_rejected(library, tmp_path):
  other = embedders.HashingEmbedder(dim=64, max_length=100)
  expert = library_fixtures.write_expert(tmp_path / "g", "g")
  with pytest.raises(store.EmbedderMismatchError, match="max_length 100"):
    store.add_expert(library, expert, _instances("g"), embedder=other)


# ---------------------------------------------------------------- atomicity


def _start_add(root: Path, expert: Path, instances: Path, expert_id: str,
               pause_at: str | None, marker: Path) -> subprocess.Popen:
  env = dict(os.environ)
  env.pop(store.PAUSE_AT_ENV, None)
  if pause_at:
    env[store.PAUSE_AT_ENV] = pause_at
    env[store.PAUSE_FILE_ENV] = str(marker)
  command = [sys.executable, "-m", "elm_jax.library.cli", "add", str(root), str(expert),
             "--instances", str(instances), "--id", expert_id]
  return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(marker: Path, process: subprocess.Popen) -> None:
  deadline = time.monotonic() + 120
  while not marker.exists():
    if process.poll() is not None:
      raise AssertionError(f"add exited early: {process.stderr.read().decode()[-2000:]}")
    if time.monotonic() > deadline:
      process.kill()
      raise AssertionError("add never reached its pause point")
    time.sleep(0.05)


def _check_old_or_new(root: Path, hashing, old: tuple[str, ...], new_id: str) -> bool:
  """Asserts the library is valid and is the old or the new one; returns 'is new'."""
  report = store.verify(root)
  assert report.ok, report.errors
  lib = store.Library(root)
  assert lib.expert_ids in (old, old + (new_id,))
  index = lib.load_index(embedder=hashing)
  assert index.embeddings.shape[0] == S * len(lib.expert_ids)
  return lib.expert_ids == old + (new_id,)


@pytest.fixture
def kill_setup(library, tmp_path):
  expert = library_fixtures.write_expert(tmp_path / "experts" / "new", "new")
  data = library_fixtures.write_jsonl(tmp_path / "new.jsonl", _instances("new"))
  return library, expert, data


@pytest.mark.parametrize("point", store.PAUSE_POINTS)
def test_add_killed_at_point_leaves_old_or_new(kill_setup, tmp_path, hashing, point):
  root, expert, data = kill_setup
  marker = tmp_path / "paused"
  process = _start_add(root, expert, data, "new", point, marker)
  _wait_for(marker, process)
  process.send_signal(signal.SIGKILL)
  process.wait()

  is_new = _check_old_or_new(root, hashing, ("alpha", "beta"), "new")
  assert is_new == (point == "committed")

  # The next writer removes the remains of the killed one.
  other = library_fixtures.write_expert(tmp_path / "experts" / "later", "later")
  store.add_expert(root, other, _instances("later"), embedder=hashing)
  report = store.verify(root)
  assert report.ok
  assert report.unreferenced == ()
  assert store.Library(root).expert_ids[-1] == "later"


def test_add_killed_at_random_times(kill_setup, tmp_path, hashing):
  root, expert, data = kill_setup
  rng = np.random.default_rng(0)
  old = ("alpha", "beta")
  for attempt in range(3):
    process = _start_add(root, expert, data, "new", None, tmp_path / "unused")
    time.sleep(float(rng.uniform(0.2, 2.5)))
    process.send_signal(signal.SIGKILL)
    process.wait()
    if _check_old_or_new(root, hashing, old, "new"):
      store.remove_expert(root, "new")
    assert store.verify(root).ok, f"attempt {attempt}"


def test_lock_serializes_writers(kill_setup, tmp_path, hashing):
  root, expert, data = kill_setup
  marker = tmp_path / "paused"
  process = _start_add(root, expert, data, "new", "locked", marker)
  _wait_for(marker, process)
  # A second writer must wait for the lock; it cannot finish while the first holds it.
  second = library_fixtures.write_expert(tmp_path / "experts" / "second", "second")
  data2 = library_fixtures.write_jsonl(tmp_path / "second.jsonl", _instances("second"))
  waiting = _start_add(root, second, data2, "second", None, tmp_path / "unused")
  try:
    waiting.wait(timeout=3)
    finished_early = True
  except subprocess.TimeoutExpired:
    finished_early = False
  assert not finished_early
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert waiting.wait(timeout=120) == 0
  assert store.Library(root).expert_ids == ("alpha", "beta", "second")


# ---------------------------------------------------------------- command line


def test_cli_round_trip(tmp_path, capsys):
  root = tmp_path / "lib"
  expert = library_fixtures.write_expert(tmp_path / "e1", "e1", "task_one")
  data = library_fixtures.write_jsonl(tmp_path / "train.jsonl", _instances("one"))
  assert cli.main(["create", str(root), "--embedder", "hashing", "--samples", "5",
                   "--text-format", "instance"]) == 0
  assert cli.main(["add", str(root), str(expert), "--instances", str(data)]) == 0
  assert cli.main(["add", str(root), str(expert), "--instances", str(data),
                   "--id", "e2"]) == 0
  assert cli.main(["list", str(root)]) == 0
  listing = capsys.readouterr().out
  assert "e1" in listing
  assert "task_one" in listing
  assert cli.main(["show", str(root), "e2", "--samples", "2"]) == 0
  shown = json.loads(capsys.readouterr().out)
  assert len(shown["samples"]) == 2
  assert shown["entry"]["rows"] == [5, 10]
  assert cli.main(["verify", str(root)]) == 0
  assert cli.main(["remove", str(root), "e1"]) == 0
  assert store.Library(root).expert_ids == ("e2",)
  assert store.read_manifest(root)["text_format"] == "instance"


def test_cli_verify_fails_on_corruption(library, capsys):
  (library / "samples" / "alpha.jsonl").write_text("{}\n", encoding="utf-8")
  assert cli.main(["verify", str(library)]) == 1
  assert "alpha.jsonl" in capsys.readouterr().out


def test_cli_reports_bad_id(library, tmp_path, capsys):
  expert = library_fixtures.write_expert(tmp_path / "e", "e")
  data = library_fixtures.write_jsonl(tmp_path / "d.jsonl", _instances("d"))
  assert cli.main(["add", str(library), str(expert), "--instances", str(data),
                   "--id", "../../x"]) == 1
  assert "Invalid expert id '../../x'" in capsys.readouterr().err


def test_add_from_seqio_task(tmp_path, hashing):
  root = _create(tmp_path / "lib", hashing)
  expert = library_fixtures.write_expert(tmp_path / "nav", "navigate", "bigbench_navigate")
  instances = instances_lib.task_instances("bigbench_navigate", "train", limit=200)
  store.add_expert(root, expert, instances, embedder=hashing,
                   source="bigbench_navigate:train")
  samples = store.Library(root).samples("navigate")
  assert len(samples) == S
  assert all(set(x.answer_choices) == {"True", "False"} for x in samples)
  assert all("Take" in x.input or "step" in x.input for x in samples)


# ---------------------------------------------------------------- audit


def test_audit_finds_exact_and_near_duplicates(tmp_path, hashing):
  root = store.create(tmp_path / "lib", embedder_kind=hashing.kind,
                      embedder_fingerprint=hashing.fingerprint, dim=hashing.dim,
                      max_length=hashing.max_length, query_max_length=512,
                      samples_per_expert=50, seed=0, text_format="instance")
  train = [Instance(text) for text in (
      "The red river flows north through the old valley towns",
      "Bananas are rich in potassium and grow in tropical climates",
      "The violin concerto was first performed in Vienna in 1806",
      "Glaciers carve deep valleys over thousands of years",
      "A binary search halves the interval at every comparison step")]
  expert = library_fixtures.write_expert(tmp_path / "rivers", "rivers")
  store.add_expert(root, expert, train, embedder=hashing)
  evaluation = [
      Instance("THE red river -- flows north, through the old valley towns!"),
      Instance("The violin concerto was first performed in Vienna in 1807"),
      Instance("Completely unrelated sentence about cooking pasta."),
  ]
  report = audit_lib.audit(store.Library(root), evaluation, against="eval",
                           embedder=hashing, threshold=0.8,
                           training_instances=train[:2])  # Only train[0] leaks.
  section = report["library_samples"]
  assert section["checked"] == 5
  assert section["exact_duplicates"] == 1
  assert section["near_duplicates"] == 2
  assert section["flagged"] == 2
  assert section["examples"][0]["exact"]
  assert section["examples"][0]["eval_index"] == 0
  assert section["examples"][1]["eval_index"] == 1
  assert section["examples"][1]["candidate"] == train[2].input
  assert report["training_instances"]["flagged"] == 1


def test_cli_audit_writes_report(library, tmp_path):
  evaluation = library_fixtures.write_jsonl(
      tmp_path / "eval.jsonl", [_instances("alpha")[i] for i in range(30)])
  output = tmp_path / "audit.json"
  assert cli.main(["audit", str(library), "--against", str(evaluation),
                   "--output", str(output)]) == 0
  report = json.loads(output.read_text())
  assert report["library_samples"]["exact_duplicates"] == S
  assert report["library_samples"]["flagged_by_label"] == {"alpha": S}
