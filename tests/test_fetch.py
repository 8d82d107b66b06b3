"""Tests of elm_jax.data.fetch and the `elm-jax data` command, on a fake artifact.

The fake artifact is a real tar.gz with a pinned sha256, registered in
`fetch.ARTIFACTS` for the test, so no test needs the network.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path, PurePosixPath

import pytest

from elm_jax.data import cli
from elm_jax.data import fetch

NUM_MEMBERS = 40


def _select(member: str) -> str | None:
  parts = PurePosixPath(member).parts
  if len(parts) < 3 or parts[1] != "data":
    return None
  return str(PurePosixPath(*parts[2:]))


def _make_archive(path: Path, members: dict[str, bytes]) -> str:
  with tarfile.open(path, "w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(name="fake")
def fixture_fake(tmp_path, monkeypatch):
  """Registers the artifact `fake` and returns its archive path."""
  members = {f"fake-1.0/data/part{i % 3}/file{i}.txt": f"content {i}\n".encode() * 50
             for i in range(NUM_MEMBERS)}
  members["fake-1.0/setup.py"] = b"ignored"
  archive = tmp_path / "fake-1.0.tar.gz"
  sha = _make_archive(archive, members)
  artifact = fetch.Artifact(name="fake", requirement="fake==1.0", filename=archive.name,
                            sha256=sha, select=_select)
  monkeypatch.setitem(fetch.ARTIFACTS, "fake", artifact)
  return archive


def _no_download(*args):
  raise AssertionError(f"unexpected download {args}")


def test_fetch_extracts_selected_members(fake, tmp_path):
  folder = fetch.fetch("fake", tmp_path / "cache", archive=fake)
  files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.txt"))
  assert len(files) == NUM_MEMBERS
  assert not (folder / "setup.py").exists()
  assert (folder / "part1" / "file1.txt").read_text().startswith("content 1\n")


def test_fetch_twice_is_noop(fake, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  folder = fetch.fetch("fake", cache, archive=fake)
  stamp = (folder / fetch.MANIFEST).stat().st_mtime_ns
  monkeypatch.setattr(fetch, "_download", _no_download)
  assert fetch.fetch("fake", cache) == folder
  assert fetch.ensure("fake", cache) == folder
  assert (folder / fetch.MANIFEST).stat().st_mtime_ns == stamp


def test_download_is_kept_and_reused(fake, tmp_path, monkeypatch):
  cache = tmp_path / "cache"

  def download(artifact, dest):
    dest.mkdir(parents=True)
    return Path(shutil.copyfile(fake, dest / artifact.filename))

  monkeypatch.setattr(fetch, "_download", download)
  folder = fetch.fetch("fake", cache)
  kept = fetch.archive_path("fake", cache)
  assert kept.read_bytes() == fake.read_bytes()

  # Extracting again uses the kept archive, not the network.
  monkeypatch.setattr(fetch, "_download", _no_download)
  (folder / fetch.MANIFEST).unlink()
  assert fetch.fetch("fake", cache) == folder
  assert fetch.verify("fake", cache) == NUM_MEMBERS


def test_checksum_mismatch_leaves_nothing(fake, tmp_path):
  cache = tmp_path / "cache"
  bad = tmp_path / "bad.tar.gz"
  _make_archive(bad, {"fake-1.0/data/x.txt": b"other"})
  with pytest.raises(fetch.ChecksumError, match="bad.tar.gz has sha256"):
    fetch.fetch("fake", cache, archive=bad)
  assert sorted(p.name for p in cache.iterdir()) == []


def test_member_escaping_cache_rejected(tmp_path, monkeypatch):
  archive = tmp_path / "evil.tar.gz"
  sha = _make_archive(archive, {"evil/data/../../x.txt": b"x"})
  monkeypatch.setitem(fetch.ARTIFACTS, "evil", fetch.Artifact(
      name="evil", requirement="evil==1", filename=archive.name, sha256=sha, select=_select))
  with pytest.raises(ValueError, match="escapes the cache folder"):
    fetch.fetch("evil", tmp_path / "cache", archive=archive)
  assert not (tmp_path / "cache" / "evil").exists()


def test_verify_detects_changed_file(fake, tmp_path):
  cache = tmp_path / "cache"
  folder = fetch.fetch("fake", cache, archive=fake)
  (folder / "part2" / "file2.txt").write_text("tampered")
  with pytest.raises(fetch.ChecksumError, match="file2.txt has sha256"):
    fetch.verify("fake", cache)


def test_verify_detects_missing_file(fake, tmp_path):
  cache = tmp_path / "cache"
  folder = fetch.fetch("fake", cache, archive=fake)
  (folder / "part0" / "file0.txt").unlink()
  with pytest.raises(fetch.ChecksumError, match="file0.txt is listed"):
    fetch.verify("fake", cache)


def test_missing_artifact_names_fetch_command(tmp_path):
  with pytest.raises(fetch.MissingDataError, match="elm-jax data fetch minilm"):
    fetch.artifact_dir("minilm", tmp_path)


def test_unknown_artifact_rejected(tmp_path):
  with pytest.raises(ValueError, match="Unknown artifact 'nope'"):
    fetch.fetch("nope", tmp_path)


def test_cache_root_precedence(tmp_path, monkeypatch):
  monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "env"))
  assert fetch.cache_root() == tmp_path / "env"
  assert fetch.cache_root(tmp_path / "arg") == tmp_path / "arg"


_KILLED_FETCH = textwrap.dedent("""
    import pathlib, sys, time
    from elm_jax.data import fetch
    marker, cache, archive, sha, halfway = sys.argv[1:]
    seen = []
    def select(member):
      parts = pathlib.PurePosixPath(member).parts
      if len(parts) < 3 or parts[1] != "data":
        return None
      seen.append(member)
      if len(seen) == int(halfway):
        pathlib.Path(marker).write_text("halfway")
        time.sleep(600)  # Killed here, in the middle of the extraction.
      return str(pathlib.PurePosixPath(*parts[2:]))
    fetch.ARTIFACTS["fake"] = fetch.Artifact(
        name="fake", requirement="fake==1.0", filename=pathlib.Path(archive).name,
        sha256=sha, select=select)
    fetch.fetch("fake", cache, archive=archive)
""")


def test_fetch_killed_halfway_then_rerun(fake, tmp_path):
  cache = tmp_path / "cache"
  marker = tmp_path / "marker"
  sha = fetch.ARTIFACTS["fake"].sha256
  process = subprocess.Popen(
      [sys.executable, "-c", _KILLED_FETCH, str(marker), str(cache), str(fake), sha,
       str(NUM_MEMBERS // 2)])
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      assert process.poll() is None, "the fetch subprocess exited before the halfway mark"
      assert time.monotonic() < deadline, "the fetch subprocess never reached halfway"
      time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
  assert process.returncode == -signal.SIGKILL

  partial = list(cache.glob(".fake.partial-*"))
  assert len(partial) == 1
  assert list(partial[0].rglob("*.txt"))  # Half-extracted files, invisible to readers.
  with pytest.raises(fetch.MissingDataError):
    fetch.artifact_dir("fake", cache)

  folder = fetch.fetch("fake", cache, archive=fake)
  assert fetch.verify("fake", cache) == NUM_MEMBERS
  assert folder == cache / "fake"
  assert not list(cache.glob(".fake.partial-*"))


def test_cli_fetch_verify_info(fake, tmp_path, capsys):
  cache = tmp_path / "cache"
  kept = fetch.archive_path("fake", cache)
  kept.parent.mkdir(parents=True)
  kept.write_bytes(fake.read_bytes())
  assert cli.main(["fetch", "fake", "--cache", str(cache)]) == 0
  assert cli.main(["verify", "fake", "--cache", str(cache)]) == 0
  assert f"{NUM_MEMBERS} files match" in capsys.readouterr().out
  assert cli.main(["info", "--cache", str(cache)]) == 0
  out = capsys.readouterr().out
  assert "fake: " in out and "archive kept" in out
  assert "bigbench: not fetched" in out


def test_cli_reports_missing_data(tmp_path, capsys):
  assert cli.main(["verify", "minilm", "--cache", str(tmp_path)]) == 1
  assert "elm-jax data fetch minilm" in capsys.readouterr().err


def test_cli_build_vocab_needs_bigbench(tmp_path, capsys):
  assert cli.main(["build-vocab", "--vocab-size", "300", "--cache", str(tmp_path)]) == 1
  assert "elm-jax data fetch bigbench" in capsys.readouterr().err


def test_cli_subprocess_info(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "elm_jax.cli", "data", "info", "--cache", str(tmp_path)],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert "vocab: none built" in result.stdout


def test_real_promptsource_verifies(promptsource_dir):
  manifest = json.loads((promptsource_dir / fetch.MANIFEST).read_text())
  assert fetch.verify("promptsource") == len(manifest["files"])


def test_cli_fetch_from_archive_file(fake, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(fetch, "_download", _no_download)
  cache = tmp_path / "cache"
  assert cli.main(["fetch", "fake", "--cache", str(cache), "--archive", str(fake)]) == 0
  assert fetch.verify("fake", cache) == NUM_MEMBERS
  assert cli.main(["fetch", "all", "--cache", str(cache), "--archive", str(fake)]) == 1
  assert "one artifact" in capsys.readouterr().err


def test_unavailable_version_names_archive_flag(tmp_path, monkeypatch):
  # A version the package index does not offer: pip fails with "No matching
  # distribution", and the error explains how to use a local copy instead.
  artifact = fetch.Artifact(name="absent", requirement="elm-jax-no-such-package==9.9.9",
                            filename="absent-9.9.9.tar.gz", sha256="0" * 64, select=_select)
  monkeypatch.setitem(fetch.ARTIFACTS, "absent", artifact)
  with pytest.raises(RuntimeError) as error:
    fetch.fetch("absent", tmp_path / "cache")
  assert "--archive PATH" in str(error.value)
  assert not list((tmp_path / "cache").glob(".absent.partial-*"))
