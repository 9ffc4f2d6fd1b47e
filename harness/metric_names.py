"""The names of the metrics a training run logs: an interface (MLflow charts, study objectives), kept
stable, and importable without torch so that validating a study file stays light."""

from __future__ import annotations

import re

LOG_METRICS = ("loss/d", "loss/g", "loss/info", "info/mi_cat", "info/h_cat", "info/mi_con", "perf/images_per_s")
EVAL_METRICS = ("eval/cat_acc", "eval/cat_acc_majority", "eval/digits_covered")
PER_CODE_METRICS = (*EVAL_METRICS, "info/mi_cat")  # also logged per categorical code as `<name>/c<i>`
PER_CODE = re.compile(rf"(?:{'|'.join(re.escape(name) for name in PER_CODE_METRICS)})/c\d+")


def is_logged(name: str) -> bool:
    """Whether a training run logs a metric of this name (for some layout of codes)."""
    return name in (*LOG_METRICS, *EVAL_METRICS) or PER_CODE.fullmatch(name) is not None


def known_names() -> str:
    """The logged names, for an error message."""
    return ", ".join((*LOG_METRICS, *EVAL_METRICS)) + " (and <name>/c<i> per categorical code)"
