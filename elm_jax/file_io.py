"""File helpers: checksums, and writes that leave either the old file or the new one."""

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Returns the sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
  """Opens a temporary file next to `path` and renames it onto `path` on success.

  The parent folder is created if missing. On an exception the temporary file is
  removed, `path` is left as it was, and the exception propagates.

  Args:
    path: the file to write.
    mode: "w" (UTF-8 text, no newline translation) or "wb".
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}.")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    kwargs = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_name)
    raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  """Writes `text` (UTF-8) to `path` through `atomic_writer`."""
  with atomic_writer(path) as f:
    f.write(text)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
  """Writes `data` to `path` through `atomic_writer`."""
  with atomic_writer(path, "wb") as f:
    f.write(data)


def write_json_atomic(path: str | os.PathLike[str], value: Any, *, indent: int = 2,
                      ensure_ascii: bool = True) -> None:
  """Writes `value` as JSON with sorted keys and a final newline, atomically."""
  write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=True,
                                     ensure_ascii=ensure_ascii) + "\n")
