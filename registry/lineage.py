"""Lineage helpers: fingerprints of training data and the code's version."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def fingerprint_arrays(*arrays: np.ndarray) -> str:
    """sha256 over the dtype, shape and bytes of each array, in order."""
    h = hashlib.sha256()
    for arr in arrays:
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 of a manifest: each file's name and content hash, sorted by name."""
    lines = []
    for p in sorted(Path(x) for x in paths):
        fh = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                fh.update(chunk)
        lines.append(f"{p.name} {fh.hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def code_version(repo: str | Path = ".") -> tuple[str, bool]:
    """(git commit, dirty?) of the work tree at ``repo``; ("", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return "", False
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return "", False
