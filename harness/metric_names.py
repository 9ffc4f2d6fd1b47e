"""The names of the metrics a training run logs: an interface (MLflow charts, study objectives), kept
stable, and importable without torch so that validating a study file stays light."""

from __future__ import annotations

import re

PROPERTIES = ("slant", "thickness", "width")  # what harness.morphology measures, in its column order
LOG_METRICS = ("loss/d", "loss/g", "loss/info", "info/mi_cat", "info/h_cat", "info/mi_con", "perf/images_per_s")
EVAL_METRICS = (
    "eval/cat_acc",  # Q's categorical code against the labels, one-to-one (Hungarian)
    "eval/cat_acc_majority",
    "eval/digits_covered",
    "eval/gen_purity",  # how purely each category of G draws one digit (the shipped classifier's)
    "eval/gen_digits_covered",
    "eval/fld",  # Fréchet distance of the classifier's features, generated vs held-out
    "eval/con_gap",  # how exclusively the continuous codes drive slant, thickness, width
)
PER_CODE_METRICS = (  # also logged per categorical code as `<name>/c<i>`
    "eval/cat_acc",
    "eval/cat_acc_majority",
    "eval/digits_covered",
    "eval/gen_purity",
    "eval/gen_digits_covered",
    "info/mi_cat",
)
PER_CODE = re.compile(rf"(?:{'|'.join(re.escape(name) for name in PER_CODE_METRICS)})/c\d+")
# per continuous code j: the largest |ρ| with a property, and the signed ρ with each
CONTINUOUS = re.compile(rf"eval/(?:con|q)_rho/c\d+(?:/(?:{'|'.join(PROPERTIES)}))?")


def is_logged(name: str) -> bool:
    """Whether a training run logs a metric of this name (for some layout of codes)."""
    return name in (*LOG_METRICS, *EVAL_METRICS) or any(p.fullmatch(name) for p in (PER_CODE, CONTINUOUS))


def known_names() -> str:
    """The logged names, for an error message."""
    return (
        ", ".join((*LOG_METRICS, *EVAL_METRICS))
        + " (and <name>/c<i> per categorical code, eval/con_rho/c<j>[/<property>] and eval/q_rho/c<j>[/<property>]"
        + f" per continuous code, properties {', '.join(PROPERTIES)})"
    )
