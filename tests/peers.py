"""Other libraries' recipes used as references by the tests and the benchmark scripts."""
from __future__ import annotations

import os
import sys
import types
from functools import partial
from typing import Callable, Optional

import torch.nn as nn


def lxt_vit_patches() -> Optional[dict[type, Callable[[type], None]]]:
    """LXT's torchvision-ViT recipe (its CP-LRP map: GELU, LayerNorm and MultiheadAttention patched so
    that gradient × input is the relevance), or None without ``lxt``. ``lxt.efficient`` is loaded
    without its package import, which pulls in Hugging Face patches that fail with some
    ``transformers`` versions."""
    try:
        import lxt
    except ImportError:
        return None
    if "lxt.efficient" not in sys.modules:
        pkg = types.ModuleType("lxt.efficient")
        pkg.__path__ = [os.path.join(os.path.dirname(lxt.__file__), "efficient")]
        sys.modules["lxt.efficient"] = pkg
    from lxt.efficient.patches import (cp_multi_head_attention_forward, layer_norm_forward, non_linear_forward,
                                       patch_method)

    return {nn.GELU: partial(patch_method, non_linear_forward, keep_original=True),
            nn.LayerNorm: partial(patch_method, layer_norm_forward),
            nn.MultiheadAttention: partial(patch_method, cp_multi_head_attention_forward, keep_original=True)}
