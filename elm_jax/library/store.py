"""The Expert Library on disk: experts, their sampled instances and embeddings.

Layout of a library folder:

```
manifest.json             the only commit point; names every file with its sha256
.lock                     fcntl lock: writers hold it exclusively, readers shared
experts/<id>/             a copy of the expert folder (expert.json + parameters)
samples/<id>.jsonl        the S instances sampled from the expert's training data
embeddings/<id>.npy       their embeddings, float32 or float16 [S, dim]
```

A writer takes the lock and deletes files the manifest does not name (the remains of
a crashed writer). It writes new files under a staging folder, fsyncs them and renames
them into place under names the current manifest does not use. Then it replaces
`manifest.json` with `os.replace`. A crash before that replace leaves the old
manifest, which names only old, untouched files; a crash after it leaves the new one.
Readers read the manifest once and open only the files it names.
"""

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from absl import logging

from elm_jax import file_io
from elm_jax.library import instances as instances_lib
from elm_jax.library.instances import Instance

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LOCK = ".lock"
STAGING_PREFIX = ".staging-"
DATA_FOLDERS = ("experts", "samples", "embeddings")
DTYPES = ("float32", "float16")

# Test hook: when set to a point name, the writer creates the file named by
# PAUSE_FILE_ENV at that point and sleeps, so a test can kill it there.
PAUSE_AT_ENV = "ELM_JAX_LIBRARY_PAUSE_AT"
PAUSE_FILE_ENV = "ELM_JAX_LIBRARY_PAUSE_FILE"
PAUSE_POINTS = ("locked", "staged", "moved", "manifest_written", "committed")


class LibraryError(RuntimeError):
  """The library folder is missing, invalid or was changed outside the library."""


class CorruptFileError(LibraryError):
  """A file does not match the sha256 the manifest records for it."""


class EmbedderMismatchError(LibraryError):
  """The library was built with another embedding model or settings."""


def _pause(point: str) -> None:
  if os.environ.get(PAUSE_AT_ENV) != point:
    return
  marker = os.environ.get(PAUSE_FILE_ENV)
  if marker:
    Path(marker).write_text(str(os.getpid()), encoding="utf-8")
  while True:
    time.sleep(3600)


sha256_file = file_io.sha256_file


def _fsync_file(path: Path) -> None:
  with open(path, "rb") as f:
    os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def _locked(root: Path, exclusive: bool) -> Iterator[None]:
  """Holds the library lock; a reader of a read-only library goes without it."""
  try:
    fd = os.open(root / LOCK, os.O_RDWR if exclusive else os.O_RDONLY)
  except PermissionError:
    if exclusive:
      raise
    yield
    return
  except FileNotFoundError as e:
    raise LibraryError(f"{root} is not an Expert Library ({LOCK} is missing); create "
                       "one with `elm-jax library create`.") from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    yield
  finally:
    os.close(fd)  # Closing the descriptor releases the lock.


def read_manifest(root: str | os.PathLike[str]) -> dict:
  root = Path(root)
  path = root / MANIFEST
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except FileNotFoundError as e:
    raise LibraryError(f"{path} not found: {root} is not an Expert Library. Create one "
                       "with `elm-jax library create`.") from e
  except json.JSONDecodeError as e:
    raise LibraryError(f"{path} is not valid JSON ({e}).") from e
  version = manifest.get("schema_version")
  if version != SCHEMA_VERSION:
    raise LibraryError(f"{path}: schema_version {version!r} is not supported "
                       f"(expected {SCHEMA_VERSION}).")
  return manifest


def _write_manifest(root: Path, manifest: dict) -> None:
  temp = root / f"{MANIFEST}.tmp-{uuid.uuid4().hex}"
  with open(temp, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1, sort_keys=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  _pause("manifest_written")
  os.replace(temp, root / MANIFEST)
  _fsync_dir(root)


def _referenced(manifest: dict) -> set[str]:
  return set(manifest["files"])


def collect_garbage(root: Path, manifest: dict) -> list[str]:
  """Deletes files and folders that the manifest does not name; returns their paths.

  Call only while holding the exclusive lock.
  """
  referenced = _referenced(manifest)
  referenced_dirs = {str(Path(p).parent) for p in referenced}
  removed = []
  for entry in root.iterdir():
    if entry.name.startswith(STAGING_PREFIX) or entry.name.startswith(f"{MANIFEST}.tmp-"):
      _remove(entry)
      removed.append(entry.name)
  for folder in DATA_FOLDERS:
    base = root / folder
    if not base.is_dir():
      continue
    for path in sorted(base.rglob("*"), reverse=True):
      relative = str(path.relative_to(root))
      if path.is_dir():
        if relative not in referenced_dirs and not any(path.iterdir()):
          path.rmdir()
        continue
      if relative not in referenced:
        path.unlink()
        removed.append(relative)
  if removed:
    logging.info("Removed %d unreferenced paths from %s: %s", len(removed), root,
                 ", ".join(removed[:10]))
  return removed


def _remove(path: Path) -> None:
  if path.is_dir():
    shutil.rmtree(path)
  else:
    path.unlink()


def _assign_rows(experts: dict) -> None:
  start = 0
  for entry in experts.values():
    entry["rows"] = [start, start + entry["num_samples"]]
    start += entry["num_samples"]


def create(root: str | os.PathLike[str], *, embedder_kind: str, embedder_fingerprint: str,
           dim: int, max_length: int, query_max_length: int,
           text_format: str = instances_lib.DEFAULT_TEXT_FORMAT,
           samples_per_expert: int = 100, seed: int = 0,
           dtype: str = "float32") -> Path:
  """Creates an empty library folder; fails if `root` exists and is not empty."""
  root = Path(root)
  if text_format not in instances_lib.TEXT_FORMATS:
    raise ValueError(f"Unknown text format {text_format!r}; expected one of "
                     f"{instances_lib.TEXT_FORMATS}.")
  if dtype not in DTYPES:
    raise ValueError(f"Unsupported embedding dtype {dtype!r}; expected one of {DTYPES}.")
  if samples_per_expert < 1:
    raise ValueError(f"samples_per_expert must be positive, got {samples_per_expert}.")
  if root.exists() and any(root.iterdir()):
    raise LibraryError(f"{root} exists and is not empty; choose a new folder.")
  root.mkdir(parents=True, exist_ok=True)
  (root / LOCK).touch()
  for folder in DATA_FOLDERS:
    (root / folder).mkdir(exist_ok=True)
  manifest = {
      "schema_version": SCHEMA_VERSION,
      "generation": 0,
      "embedding": {"kind": embedder_kind, "fingerprint": embedder_fingerprint,
                    "dim": dim, "max_length": max_length,
                    "query_max_length": query_max_length},
      "text_format": text_format,
      "samples_per_expert": samples_per_expert,
      "seed": seed,
      "dtype": dtype,
      "experts": {},
      "files": {},
  }
  with _locked(root, exclusive=True):
    _write_manifest(root, manifest)
  return root


def check_embedder(manifest: dict, embedder: Any, root: Path | str = "library") -> None:
  """Raises EmbedderMismatchError unless `embedder` is the library's embedding model."""
  recorded = manifest["embedding"]
  if (embedder.kind != recorded["kind"] or embedder.fingerprint != recorded["fingerprint"]):
    raise EmbedderMismatchError(
        f"{root} was built with embedding model {recorded['kind']!r} (fingerprint "
        f"{recorded['fingerprint'][:16]}..., max_length {recorded['max_length']}), but "
        f"the embedder given is {embedder.kind!r} (fingerprint "
        f"{embedder.fingerprint[:16]}..., max_length {embedder.max_length}). Use the "
        "library's embedding model, or build a new library with this one.")


def read_expert_json(expert_dir: Path) -> dict:
  path = expert_dir / "expert.json"
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except FileNotFoundError as e:
    raise LibraryError(f"{path} not found: {expert_dir} is not an expert folder.") from e
  except json.JSONDecodeError as e:
    raise LibraryError(f"{path} is not valid JSON ({e}).") from e
  params_name = meta.get("parameters", "params.safetensors")
  if Path(params_name).name != params_name:
    raise LibraryError(f"{path}: 'parameters' must be a file name, got {params_name!r}.")
  params_path = expert_dir / params_name
  if not params_path.is_file():
    raise LibraryError(f"{params_path} not found (named by 'parameters' in {path}).")
  expected = meta.get("parameters_sha256")
  if expected and sha256_file(params_path) != expected:
    raise CorruptFileError(f"{params_path} does not match parameters_sha256 in {path}.")
  return meta


def embed_instances(instances: Sequence[Instance], *, embedder: Any, text_format: str,
                    max_length: int, dtype: str) -> np.ndarray:
  texts = [instances_lib.format_text(x, text_format) for x in instances]
  return np.asarray(embedder.embed(texts, max_length=max_length), np.float32).astype(dtype)


def add_expert(root: str | os.PathLike[str], expert_dir: str | os.PathLike[str],
               instances: Sequence[Instance], *, embedder: Any,
               expert_id: str | None = None, source: str | None = None) -> dict:
  """Adds an expert with S instances sampled from `instances`; returns its manifest entry.

  Sampling and embedding happen before the lock is taken; the commit is atomic.
  """
  root, expert_dir = Path(root), Path(expert_dir)
  manifest = read_manifest(root)
  check_embedder(manifest, embedder, root)
  meta = read_expert_json(expert_dir)
  if expert_id is None:
    expert_id = str(meta.get("id", ""))
  instances_lib.validate_id(expert_id)
  if expert_id in manifest["experts"]:
    raise LibraryError(f"{root} already has expert {expert_id!r}; remove it first or "
                       "pass another --id.")
  if not instances:
    raise ValueError(f"No training instances given for expert {expert_id!r}.")

  # Sample and embed outside the lock: this is the slow part.
  sampled = instances_lib.sample_instances(instances, manifest["samples_per_expert"],
                                           manifest["seed"])
  vectors = embed_instances(sampled, embedder=embedder, text_format=manifest["text_format"],
                            max_length=manifest["embedding"]["max_length"],
                            dtype=manifest["dtype"])

  with _locked(root, exclusive=True):
    _pause("locked")
    manifest = read_manifest(root)
    check_embedder(manifest, embedder, root)
    if expert_id in manifest["experts"]:
      raise LibraryError(f"{root} already has expert {expert_id!r}.")
    collect_garbage(root, manifest)

    # Stage every new file and fsync it.
    staging = root / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
    staged_expert = staging / "experts" / expert_id
    staged_expert.mkdir(parents=True)
    params_name = meta.get("parameters", "params.safetensors")
    for name in ("expert.json", params_name):
      shutil.copyfile(expert_dir / name, staged_expert / name)
    (staging / "samples").mkdir()
    instances_lib.write_jsonl(staging / "samples" / f"{expert_id}.jsonl", sampled)
    (staging / "embeddings").mkdir()
    with open(staging / "embeddings" / f"{expert_id}.npy", "wb") as f:
      np.save(f, vectors, allow_pickle=False)
    new_files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
      _fsync_file(path)
      new_files[str(path.relative_to(staging))] = sha256_file(path)
    _pause("staged")

    # Move the files under names that the current manifest does not use.
    os.rename(staged_expert, root / "experts" / expert_id)
    for relative in (f"samples/{expert_id}.jsonl", f"embeddings/{expert_id}.npy"):
      os.rename(staging / relative, root / relative)
    for folder in DATA_FOLDERS:
      _fsync_dir(root / folder)
    _pause("moved")

    # Commit.
    entry = {
        "path": f"experts/{expert_id}",
        "parameters": params_name,
        "kind": meta.get("kind"),
        "task": meta.get("task"),
        "source": source,
        "samples": f"samples/{expert_id}.jsonl",
        "embeddings": f"embeddings/{expert_id}.npy",
        "num_samples": len(sampled),
        "source_size": len(instances),
        "added": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    manifest["experts"][expert_id] = entry
    _assign_rows(manifest["experts"])
    manifest["files"].update(new_files)
    manifest["generation"] += 1
    _write_manifest(root, manifest)
    _pause("committed")
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Added expert %s to %s (%d samples, generation %d).", expert_id, root,
               len(sampled), manifest["generation"])
  return entry


def remove_expert(root: str | os.PathLike[str], expert_id: str) -> None:
  """Removes an expert; its files are deleted after the new manifest is committed."""
  root = Path(root)
  instances_lib.validate_id(expert_id)
  with _locked(root, exclusive=True):
    manifest = read_manifest(root)
    if expert_id not in manifest["experts"]:
      raise LibraryError(f"{root} has no expert {expert_id!r}; known: "
                         f"{', '.join(manifest['experts']) or 'none'}.")
    entry = manifest["experts"].pop(expert_id)
    prefixes = (entry["path"] + "/", entry["samples"], entry["embeddings"])
    manifest["files"] = {p: h for p, h in manifest["files"].items()
                         if not p.startswith(prefixes)}
    _assign_rows(manifest["experts"])
    manifest["generation"] += 1
    _write_manifest(root, manifest)
    collect_garbage(root, manifest)
  logging.info("Removed expert %s from %s (generation %d).", expert_id, root,
               manifest["generation"])


@dataclasses.dataclass(frozen=True)
class VerifyReport:
  """The result of checking a library against its manifest."""
  checked: int
  errors: tuple[str, ...]
  unreferenced: tuple[str, ...]

  @property
  def ok(self) -> bool:
    return not self.errors


def verify(root: str | os.PathLike[str]) -> VerifyReport:
  """Checks every file the manifest names, and each embedding matrix's shape and dtype."""
  root = Path(root)
  errors = []
  with _locked(root, exclusive=False):
    manifest = read_manifest(root)
    for relative, expected in manifest["files"].items():
      path = root / relative
      if not path.is_file():
        errors.append(f"{path}: missing (listed in {MANIFEST}).")
      elif sha256_file(path) != expected:
        errors.append(f"{path}: sha256 does not match {MANIFEST}.")
    for expert_id, entry in manifest["experts"].items():
      for key in ("samples", "embeddings"):
        if entry[key] not in manifest["files"]:
          errors.append(f"{MANIFEST}: {key} file of expert {expert_id!r} has no checksum.")
      path = root / entry["embeddings"]
      if path.is_file():
        try:
          array = np.load(path, allow_pickle=False, mmap_mode="r")
          expected_shape = (entry["num_samples"], manifest["embedding"]["dim"])
          if array.shape != expected_shape or str(array.dtype) != manifest["dtype"]:
            errors.append(f"{path}: shape {array.shape} {array.dtype}, expected "
                          f"{expected_shape} {manifest['dtype']}.")
        except ValueError as e:
          errors.append(f"{path}: not a readable .npy file ({e}).")
    referenced = _referenced(manifest)
    unreferenced = [p.name for p in root.iterdir()
                    if p.name.startswith((STAGING_PREFIX, f"{MANIFEST}.tmp-"))]
    for folder in DATA_FOLDERS:
      if (root / folder).is_dir():
        unreferenced += [str(p.relative_to(root)) for p in (root / folder).rglob("*")
                         if p.is_file() and str(p.relative_to(root)) not in referenced]
  return VerifyReport(len(manifest["files"]), tuple(errors), tuple(sorted(unreferenced)))


@dataclasses.dataclass(frozen=True)
class LibraryIndex:
  """All library embeddings in one matrix, with the expert of each row.

  Attributes:
    embeddings: float32 [rows, dim], L2-normalized.
    row_expert: int32 [rows], an index into `expert_ids`.
    expert_ids: the experts in manifest order.
    fingerprint: the embedding model's fingerprint.
  """
  embeddings: np.ndarray
  row_expert: np.ndarray
  expert_ids: tuple[str, ...]
  fingerprint: str

  def expert_of_row(self, row: int) -> str:
    return self.expert_ids[int(self.row_expert[row])]


class Library:
  """A read-only view of one manifest generation of a library folder."""

  def __init__(self, root: str | os.PathLike[str]):
    self.root = Path(root)
    self.manifest = read_manifest(self.root)

  @property
  def expert_ids(self) -> tuple[str, ...]:
    return tuple(self.manifest["experts"])

  @property
  def generation(self) -> int:
    return self.manifest["generation"]

  @property
  def text_format(self) -> str:
    return self.manifest["text_format"]

  def entry(self, expert_id: str) -> dict:
    if expert_id not in self.manifest["experts"]:
      raise LibraryError(f"{self.root} has no expert {expert_id!r}; known: "
                         f"{', '.join(self.expert_ids) or 'none'}.")
    return self.manifest["experts"][expert_id]

  def check_embedder(self, embedder: Any) -> None:
    check_embedder(self.manifest, embedder, self.root)

  def _checked_path(self, relative: str) -> Path:
    """Returns the path of a manifest file after checking its sha256."""
    expected = self.manifest["files"].get(relative)
    path = self.root / relative
    if expected is None:
      raise LibraryError(f"{path} has no checksum in {self.root / MANIFEST}.")
    if not path.is_file():
      raise CorruptFileError(
          f"{path} is missing. If another process removed its expert after generation "
          f"{self.generation} was opened, open the library again; otherwise run "
          f"`elm-jax library verify {self.root}` and re-add the expert.")
    actual = sha256_file(path)
    if actual != expected:
      raise CorruptFileError(
          f"{path} is corrupted: sha256 {actual[:16]}... but {MANIFEST} records "
          f"{expected[:16]}.... Run `elm-jax library verify {self.root}`, then remove "
          "and re-add the expert.")
    return path

  def samples(self, expert_id: str) -> list[Instance]:
    path = self._checked_path(self.entry(expert_id)["samples"])
    return instances_lib.read_jsonl(path)

  def embeddings(self, expert_id: str) -> np.ndarray:
    entry = self.entry(expert_id)
    path = self._checked_path(entry["embeddings"])
    array = np.load(path, allow_pickle=False)
    expected = (entry["num_samples"], self.manifest["embedding"]["dim"])
    if array.shape != expected:
      raise CorruptFileError(f"{path} has shape {array.shape}, expected {expected}.")
    return array.astype(np.float32)

  def expert_dir(self, expert_id: str) -> Path:
    """Returns the expert's folder after checking the checksums of its files."""
    entry = self.entry(expert_id)
    for relative in self.manifest["files"]:
      if relative.startswith(entry["path"] + "/"):
        self._checked_path(relative)
    return self.root / entry["path"]

  def load_index(self, *, embedder: Any | None = None) -> LibraryIndex:
    """Loads every expert's embeddings (checksums checked) into one LibraryIndex."""
    if embedder is not None:
      self.check_embedder(embedder)
    dim = self.manifest["embedding"]["dim"]
    with _locked(self.root, exclusive=False):
      blocks = [self.embeddings(e) for e in self.expert_ids]
    rows = [b.shape[0] for b in blocks]
    embeddings = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
    row_expert = np.repeat(np.arange(len(blocks), dtype=np.int32), rows)
    return LibraryIndex(embeddings, row_expert, self.expert_ids,
                        self.manifest["embedding"]["fingerprint"])

  def load_samples(self) -> list[Instance]:
    """Returns all sample instances in row order (row i of the index is item i)."""
    with _locked(self.root, exclusive=False):
      return [x for e in self.expert_ids for x in self.samples(e)]
