"""The files a batch run reads, and the names their outputs get.

Arguments are files or folders; a folder stands for every image under it (:func:`find_images`).
An image's output name is its path relative to its root (the folder it was found under, or its own
folder for a file argument) without the suffix, so ``DIR/a/x.png`` becomes ``a/x``. Names never
collide: when two different files would share one (``a/x.png`` and ``b/x.png`` given as files,
``x.png`` and ``x.dcm``), each gets ``-`` plus the first 8 hex digits of the SHA-256 of its resolved
path; a name an output folder already gave a file stays that file's (``known``), so reruns with more
or fewer inputs keep every earlier output's name.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..data.images import IMAGE_EXTENSIONS, find_images


@dataclass(frozen=True)
class InputFile:
    """One image of a run: ``path`` as found, ``key`` its resolved absolute path (its identity in the
    output folder's records), ``name`` its output name (relative, no suffix, ``/``-separated)."""

    path: Path
    key: str
    name: str


@dataclass(frozen=True)
class InputProblem:
    """An argument that yields no image: what was given and why."""

    path: Path
    reason: str


def _key(path: Path) -> str:
    return os.path.realpath(path)


def short_digest(key: str) -> str:
    """First 8 hex digits of SHA-256 of ``key``: what disambiguates two outputs of one name."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def collect_inputs(arguments: Sequence[str | os.PathLike], known: Mapping[str, str] = ()
                   ) -> tuple[list[InputFile], list[InputProblem]]:
    """The images ``arguments`` name, each once, with collision-free output names (module
    docstring), and the arguments that name none. ``known``: resolved path -> output name already
    used for it in the output folder."""
    known = dict(known or {})
    found: list[tuple[Path, str]] = []  # (path, base name)
    problems: list[InputProblem] = []
    for arg in arguments:
        p = Path(arg)
        if p.is_dir():
            images = find_images(p)
            if not images:
                problems.append(InputProblem(p, f"folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
            found += [(f, f.relative_to(p).with_suffix("").as_posix()) for f in images]
        elif p.exists() or p.is_symlink():
            found.append((p, p.stem))  # not-a-file and unreadable cases are reported when read
        else:
            problems.append(InputProblem(p, "file not found"))
    seen: set[str] = set()
    unique: list[tuple[Path, str, str]] = []
    for path, base in found:
        key = _key(path)
        if key not in seen:
            seen.add(key)
            unique.append((path, key, base))
    taken = {name.casefold(): key for key, name in known.items()}  # case-insensitive file systems
    new_bases = Counter(base.casefold() for _, key, base in unique if key not in known)
    out: list[InputFile] = []
    for path, key, base in unique:
        name = known.get(key)
        if name is None:
            clash = new_bases[base.casefold()] > 1 or taken.get(base.casefold(), key) != key
            name = f"{base}-{short_digest(key)}" if clash else base
            taken[name.casefold()] = key
        out.append(InputFile(path, key, name))
    return out, problems


__all__ = ["InputFile", "InputProblem", "collect_inputs", "short_digest"]
