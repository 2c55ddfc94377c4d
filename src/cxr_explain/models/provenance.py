"""A checkpoint's provenance as people read it: without the training machine's paths, and its
training data in words.

Checkpoints record where they were made (``--data /abs/path/to/bench``, the full training
command); those absolute paths mean nothing on another machine and must not leak into shipped
files or reports. :func:`strip_machine_paths` replaces every absolute path in a string (or in the
strings of a nested dict / list) by its last component; :func:`training_data_text` says what a
checkpoint was trained on, from the keys :mod:`cxr_explain.training` writes.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["strip_machine_paths", "training_data_text"]

# An absolute POSIX path (/a/b) or a Windows one (C:\a\b), not inside a word, a URL or a relative path.
_ABSOLUTE = re.compile(r"(?<![\w.:/\\~-])(?:[A-Za-z]:)?(?:[/\\][^\s/\\'\"`,;]+)+[/\\]?")


def _last_part(m: re.Match) -> str:
    parts = [p for p in re.split(r"[/\\]", m.group(0)) if p]
    return parts[-1] if parts else m.group(0)


def strip_machine_paths(value: Any) -> Any:
    """``value`` with every absolute path in its strings replaced by the path's last component
    (``--data /abs/path/bench_s0 --out /abs/m`` → ``--data bench_s0 --out m``); dicts, lists and
    tuples are walked, other values returned as they are."""
    if isinstance(value, str):
        return _ABSOLUTE.sub(_last_part, value)
    if isinstance(value, Mapping):
        return {k: strip_machine_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(strip_machine_paths(v) for v in value)
    return value


def training_data_text(provenance: Mapping[str, Any]) -> str:
    """What the checkpoint was trained on, in words: the synthetic benchmark (seed, films, size,
    split sizes) for a ``cxr_explain.training`` run on it, the data folder's name and layout for
    other runs, the source for torchxrayvision weights, else "not recorded in the checkpoint"."""
    prov = dict(provenance or {})
    counts = ""
    if prov.get("n_train") is not None:
        counts = f"; {prov['n_train']} training / {prov.get('n_val', '?')} validation films"
    phantom = prov.get("phantom")
    if isinstance(phantom, Mapping) and phantom:
        bits = [f"seed {phantom['seed']}" if phantom.get("seed") is not None else "",
                f"{phantom['n']} films" if phantom.get("n") else "",
                f"{phantom['size']} px" if phantom.get("size") else ""]
        cue = f", planted '{phantom['shortcut']}' shortcut" if phantom.get("shortcut") else ""
        return (f"synthetic benchmark films only (cxr-explain phantom, {', '.join(b for b in bits if b)}{cue})"
                f"{counts}; no real radiograph")
    if prov.get("data"):
        layout = f", {prov['layout']} layout" if prov.get("layout") else ""
        return f"'{strip_machine_paths(str(prov['data']))}'{layout}{counts}"
    if prov.get("source"):
        return strip_machine_paths(str(prov["source"])) + (f" ({prov['weights']})" if prov.get("weights") else "")
    return "not recorded in the checkpoint"
