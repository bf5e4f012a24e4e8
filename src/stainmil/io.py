"""Atomic file writes: write to a temporary file in the same folder, then rename over the target.

A reader never sees a half-written file, and a killed process leaves only ``*.tmp`` litter,
never a file that looks finished.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from stainmil.errors import output_error


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``.

    ``suffix`` lets writers that infer the format from the name (matplotlib, pandas) see it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temporary(path, suffix)
    except OSError as exc:
        _raise_output_error(exc, path.parent, creating=True)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile: the old file (or none) stays
        _raise_output_error(exc, path.parent, creating=False)
    finally:
        if tmp.exists():
            tmp.unlink()


def _raise_output_error(exc: OSError, folder: Path, creating: bool) -> None:
    """Re-raise ``exc`` as one sentence when it is a full or read-only folder, else as it is."""
    found = output_error(exc, folder, creating)
    if found is None:
        raise exc
    raise found from exc


def _new_temporary(path: Path, suffix: str) -> Path:
    """A new empty file beside ``path``, made with mode 0666 less the process umask (as any other output file:
    shared like the rest; mkstemp's 0600 would need the umask, which cannot be read without changing it)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}.tmp"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"could not create a temporary file beside {path}")


_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


def array_digest(*arrays: Any) -> str:
    """BLAKE2b (128 bits) of arrays' bytes as written (C order), in turn: the ``checksum`` attribute a store slice,
    a coordinates file or a transform file carries, so a flipped byte or a truncated copy is found on reading."""
    import hashlib

    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    for array in arrays:
        digest.update(np.ascontiguousarray(array).view(np.uint8).data)
    return digest.hexdigest()


def safe_name(text: object) -> str:
    """Text usable as (part of) a file name: runs of other characters become '_'."""
    return _UNSAFE.sub("_", str(text))


def atomic_write(path: str | Path, writer: Callable[[Path], Any], suffix: str = "") -> Path:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path, suffix=suffix) as tmp:
        writer(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def subplots(nrows: int = 1, ncols: int = 1, figsize: tuple[float, float] | None = None, **kwargs: Any):
    """(figure, axes) without pyplot: no backend is chosen or switched (a notebook user's stays as it is)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix; .jpg at quality 85); a pyplot figure
    (e.g. Optuna's) is closed afterwards."""
    path = Path(path)
    fmt = {"jpg": "jpeg"}.get(path.suffix[1:], path.suffix[1:])
    extra = {"pil_kwargs": {"quality": 85}} if fmt == "jpeg" else {}
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=fmt, **extra),
                 suffix=path.suffix)
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


def save_image(array: Any, path: str | Path, quality: int = 82) -> Path:
    """Save an (H, W, 3) uint8 array atomically as JPEG (.jpg/.jpeg, at ``quality``) or PNG."""
    from PIL import Image

    path = Path(path)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    extra = {"quality": quality} if fmt == "JPEG" else {}
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format=fmt, **extra), suffix=path.suffix)


def walk_files(root: str | Path) -> list[Path]:
    """Every file below ``root`` in sorted, deterministic order (hidden files skipped). Linked folders are followed
    (cohorts are often assembled from links) but each folder is entered once: a link loop ends the walk there."""
    files = []
    seen: set[tuple[int, int]] = set()
    for directory, subdirs, names in os.walk(root, followlinks=True):
        info = os.stat(directory)
        if (info.st_dev, info.st_ino) in seen:
            subdirs[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        subdirs.sort()
        files.extend(Path(directory) / name for name in sorted(names) if not name.startswith("."))
    return files
