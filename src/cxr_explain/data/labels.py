"""Finding names as the datasets and checkpoints spell them, and label parsing / validation."""
from __future__ import annotations

import difflib
from typing import Iterable, Optional, Sequence, Union
from pathlib import Path

from ..errors import DataError

__all__ = [
    "CHEXNET_FINDINGS",
    "BOX_FINDINGS",
    "XRV_PATHOLOGIES",
    "RSNA_FINDINGS",
    "BOX_LABEL_ALIASES",
    "NO_FINDING",
    "parse_finding_labels",
    "canonical_box_label",
    "check_labels",
    "LABEL_ALIASES",
    "find_label",
    "label_index",
]

#: The 14 ChestX-ray14 findings in CheXNet / arnoweng / jrzech output order (exact spellings).
CHEXNET_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

#: The 8 classes with boxes in BBox_List_2017.csv, in Wang et al.'s order (model-side spelling).
BOX_FINDINGS: tuple[str, ...] = CHEXNET_FINDINGS[:8]

#: torchxrayvision's 18 outputs, in order. Index by ``model.pathologies``, never by position.
XRV_PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

#: Findings an RSNA Pneumonia dataset can output (both mean Target == 1, as torchxrayvision maps it).
RSNA_FINDINGS: tuple[str, ...] = ("Pneumonia", "Lung Opacity")

#: BBox_List_2017.csv spells one class differently from Data_Entry.
BOX_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}

NO_FINDING = "No Finding"

#: Other datasets' names for the same finding (normalised spelling -> normalised spelling). The one
#: alias table: model outputs, box files and targets are all matched through :func:`find_label`.
LABEL_ALIASES: dict[str, str] = {
    "infiltrate": "infiltration",  # NIH's box file vs its label column
    "pleural effusion": "effusion",  # CheXpert / MIMIC vs NIH / torchxrayvision
    "airspace opacity": "lung opacity",  # CheXlocalize's segmentation files vs CheXpert's labels
}


def _norm(name: str) -> str:
    """Case-, underscore- and space-insensitive spelling, aliases applied."""
    key = " ".join(str(name).replace("_", " ").lower().split())
    return LABEL_ALIASES.get(key, key)


def find_label(name: str, labels: Sequence[str]) -> Optional[int]:
    """Index of finding ``name`` in ``labels`` (a model's outputs): the exact spelling first, then
    case/space/underscore-insensitive with :data:`LABEL_ALIASES`; None when absent or ambiguous."""
    labels = list(labels)
    if name in labels:
        return labels.index(name)
    want = _norm(name)
    hits = [i for i, lab in enumerate(labels) if lab and _norm(lab) == want]
    return hits[0] if len(hits) == 1 else None


def label_index(name: str, labels: Sequence[str]) -> int:
    """:func:`find_label`, or a one-line :class:`~cxr_explain.errors.CxrExplainError` naming the
    closest output and listing them all."""
    from ..errors import CxrExplainError

    i = find_label(name, labels)
    if i is not None:
        return i
    real = [lab for lab in labels if lab]
    close = difflib.get_close_matches(name, real, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CxrExplainError(f"the model has no output named {name!r}; {hint}its outputs are: {', '.join(real)}")


def parse_finding_labels(text: object) -> list[str]:
    """Split a ``|``-joined label string (``"A|B"``) into names, stripping spaces, dropping empties.

    ``"No Finding"`` is returned as is; callers turn it into an all-zero vector.
    """
    if text is None or (isinstance(text, float) and text != text):  # None / NaN
        return []
    return [part.strip() for part in str(text).split("|") if part.strip()]


def canonical_box_label(name: str) -> str:
    """Map a box label to the model-side spelling (``Infiltrate`` → ``Infiltration``)."""
    name = name.strip()
    return BOX_LABEL_ALIASES.get(name, name)


def check_labels(
    names: Iterable[str],
    known: Sequence[str] = CHEXNET_FINDINGS + (NO_FINDING,),
    source: Union[str, Path] = "labels",
    where: Optional[str] = None,
) -> list[str]:
    """Return ``names`` unchanged if each is in ``known``; else raise a one-line DataError naming
    ``source`` (a file), ``where`` (e.g. ``row 12``), the bad label and the closest known one."""
    names = list(names)
    allowed = set(known)
    for name in names:
        if name not in allowed:
            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            loc = f" ({where})" if where else ""
            raise DataError(
                f"{source}{loc}: unknown label {name!r}{hint}; known labels: {', '.join(known)}"
            )
    return names
