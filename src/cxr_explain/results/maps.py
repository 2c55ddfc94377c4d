"""The saved heatmaps of an evaluation: ``maps/<method>/<image>.npz``, one array per finding.

The one on-disk map format of an evaluation folder (docs/evaluation.md §7): per finding ``h / s``
as float16 and ``s = max|h|`` as float32 under ``<finding>__scale``, so that small-magnitude maps
keep float16's relative precision (|error| <= 2^-11 · max|h|). Maps are at the model's input
resolution; the report brings them to the original image with the model's preprocessing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import CxrExplainError

__all__ = ["MAPS_DIR", "SCALE_SUFFIX", "map_file", "save_maps", "load_maps"]

MAPS_DIR = "maps"
SCALE_SUFFIX = "__scale"


def map_file(method: str, image_id: str) -> str:
    """The path of an (image, method) map file relative to the results folder (``maps/<method>/<id>.npz``;
    characters outside ``[A-Za-z0-9._-]`` of the image id become ``__``)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "__", image_id)
    return (Path(MAPS_DIR) / method / f"{safe}.npz").as_posix()


def save_maps(path: Path | str, maps: Mapping[str, np.ndarray]) -> None:
    """Write ``{finding: (H, W) map}`` as float16 ``.npz`` with per-finding float32 scales, atomically.

    Stored, not deflated: zlib won 7 % on float16 relevance at 40 times the time (2.6 ms against
    0.07 ms a 224² map), which on a dataset run cost more than the rest of writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, v in maps.items():
        v = np.asarray(v, dtype=np.float32)
        s = float(np.abs(v).max()) if v.size else 0.0
        s = s if s > 0 and np.isfinite(s) else 1.0
        arrays[k] = (v / s).astype(np.float16)
        arrays[k + SCALE_SUFFIX] = np.float32(s)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
    os.replace(tmp, path)


def load_maps(path: Path | str) -> dict[str, np.ndarray]:
    """The maps of one (image, method) written by :func:`save_maps`: ``{finding: (H, W) float32}``."""
    p = Path(path)
    try:
        with np.load(p) as z:
            return {k: z[k].astype(np.float32) * float(z[k + SCALE_SUFFIX]) if k + SCALE_SUFFIX in z.files
                    else z[k].astype(np.float32) for k in z.files if not k.endswith(SCALE_SUFFIX)}
    except (OSError, ValueError) as e:
        raise CxrExplainError(f"cannot read heatmaps {p}: {e}; rerun evaluate into this folder") from None
