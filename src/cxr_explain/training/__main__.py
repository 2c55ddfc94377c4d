"""``python -m cxr_explain.training {train,auroc} ...``."""
from .commands import main

raise SystemExit(main())
