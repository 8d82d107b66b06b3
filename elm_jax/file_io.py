"""File helpers shared by the packages that verify what they read."""

import hashlib
import os


def sha256_file(path: str | os.PathLike[str]) -> str:
  """Returns the sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
