"""Atomic writes and checksums in elm_jax.file_io."""

import hashlib
import json

import pytest

from elm_jax import file_io


def test_atomic_writer_keeps_old_file_on_error(tmp_path):
  path = tmp_path / "out.json"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="boom"):
    with file_io.atomic_writer(path) as f:
      f.write("partial")
      raise RuntimeError("boom")
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unencodable_json_leaves_no_file(tmp_path):
  path = tmp_path / "run" / "results.json"
  with pytest.raises(TypeError):
    file_io.write_json_atomic(path, {"a": object()})
  assert not path.exists()
  assert not list(path.parent.glob("*"))


def test_json_sorted_with_final_newline(tmp_path):
  path = tmp_path / "nested" / "value.json"
  file_io.write_json_atomic(path, {"b": 1, "a": [1, 2]}, indent=1)
  text = path.read_text(encoding="utf-8")
  assert text == '{\n "a": [\n  1,\n  2\n ],\n "b": 1\n}\n'
  assert json.loads(text) == {"a": [1, 2], "b": 1}


def test_text_and_bytes_replace_the_old_contents(tmp_path):
  path = tmp_path / "file"
  file_io.write_text_atomic(path, "first line\nsecond – line\n")
  assert path.read_text(encoding="utf-8") == "first line\nsecond – line\n"
  file_io.write_bytes_atomic(path, b"\x00\x01")
  assert path.read_bytes() == b"\x00\x01"
  assert file_io.sha256_file(path) == hashlib.sha256(b"\x00\x01").hexdigest()


def test_unknown_mode_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="mode"):
    with file_io.atomic_writer(tmp_path / "x", "a"):
      pass
