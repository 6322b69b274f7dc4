"""hf_badm: BADM (Batch ADMM) for the Hugging Face training stack."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from hf_badm.optim import BADM

__version__ = "0.1.0"
__all__ = ["BADM", "BADMConfig", "BADMTrainer", "BADMTrainerMixin", "BADMMetricsCallback", "create_badm_optimizer",
           "badm_optimizer_cls_and_kwargs", "solve_report"]

# The Trainer glue imports transformers; load it on first use so `import hf_badm` stays light.
_LAZY = {
    "BADMConfig": "hf_badm.config",
    "create_badm_optimizer": "hf_badm.factory",
    "badm_optimizer_cls_and_kwargs": "hf_badm.factory",
    "solve_report": "hf_badm.factory",
    "BADMTrainer": "hf_badm.trainer",
    "BADMTrainerMixin": "hf_badm.trainer",
    "BADMMetricsCallback": "hf_badm.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_badm' has no attribute {name!r}")
