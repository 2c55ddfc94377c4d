"""Plain records shared by the dataset readers, the metrics and the report."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class Box:
    """An axis-aligned lesion box in the pixel space of the original image.

    ``x, y`` is the top-left corner, ``w, h`` the width and height (floats, as in NIH's
    ``BBox_List_2017.csv``). ``finding`` uses the model-side spelling (``Infiltration``).
    """

    finding: str
    x: float
    y: float
    w: float
    h: float

    def scaled(self, sx: float, sy: float) -> "Box":
        """The same box after resizing the image by ``sx`` horizontally and ``sy`` vertically."""
        return Box(self.finding, self.x * sx, self.y * sy, self.w * sx, self.h * sy)

    def to_mask(self, height: int, width: int) -> np.ndarray:
        """Rasterise as ``[y, y+h) x [x, x+w)`` rounded to the nearest pixel, clipped to the image."""
        y0 = int(np.clip(round(self.y), 0, height))
        y1 = int(np.clip(round(self.y + self.h), 0, height))
        x0 = int(np.clip(round(self.x), 0, width))
        x1 = int(np.clip(round(self.x + self.w), 0, width))
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = True
        return mask


@dataclass
class Sample:
    """One image of a dataset with its labels and ground truth.

    ``labels`` is a float vector over the dataset's ``findings`` (1 = present, 0 = absent);
    ``masks`` maps a finding to an exact pixel mask (synthetic data) in original pixel space.
    """

    image_id: str
    path: Path
    labels: np.ndarray
    boxes: list[Box] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    patient_id: Optional[str] = None
    view: Optional[str] = None
