"""SHA-256 of the files netshrink writes and later trusts: the baseline cache, each trial's artifact, the exported ONNX.

Each hash is recorded where its file is written (next to the cached baseline, as a tag of the trial's MLflow
run, in the model card) and checked whenever the file is read back. A file whose bytes were zeroed keeps its
size and may still parse: only the hash tells it from the file that was measured.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def unreadable(error: OSError) -> str:
    return f"it cannot be read ({error.strerror or error})"


def mismatch(actual: str, expected: str) -> str | None:
    """Why a file whose SHA-256 is ``actual`` is not the one recorded as ``expected``, in words; None when it is."""
    if actual == expected:
        return None
    return f"its SHA-256 is {actual[:12]}..., not the {expected[:12]}... recorded when it was written: it was changed or damaged since"


def damage(path: str | os.PathLike, expected: str) -> str | None:
    """Why the file at ``path`` is not the one whose SHA-256 is ``expected``, in words; None when it is."""
    try:
        return mismatch(file_sha256(path), expected)
    except OSError as error:
        return unreadable(error)


def write_checksum(path: Path, digest: str | None = None) -> str:
    """Record ``path``'s SHA-256 (``digest``, where its bytes are hashed already) in ``<path>.sha256``, in ``sha256sum``'s
    format (``sha256sum -c`` checks it). Returns it."""
    digest = digest or file_sha256(path)
    checksum_file(path).write_text(f"{digest}  {path.name}\n")
    return digest


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def recorded_checksum(path: Path) -> str | None:
    """The SHA-256 ``write_checksum`` recorded for ``path``; None if there is none (or it cannot be read)."""
    try:
        text = checksum_file(path).read_text().split()
    except OSError:
        return None
    return text[0] if text and len(text[0]) == 64 else None
