"""Evaluation of frozen features: probes, metrics, Δm, reports, result tables and plots.

``evaluate_task`` is the entry point the trainer calls once per task; ``metrics`` holds the scores and Δm.
The sub-modules ``report``, ``tables`` and ``plots`` (which imports matplotlib) turn results into markdown,
the results pages' tables and PNG figures; they are imported by name, e.g. ``from mtcl_jax.eval import plots``.
"""

from mtcl_jax.eval import metrics
from mtcl_jax.eval.probes import (
    DEFAULT_GRIDS,
    HPARAM_NAMES,
    PROBE_KINDS,
    Probe,
    evaluate_task,
    fit_probe,
    validation_split,
)

__all__ = [
    "DEFAULT_GRIDS",
    "HPARAM_NAMES",
    "PROBE_KINDS",
    "Probe",
    "evaluate_task",
    "fit_probe",
    "metrics",
    "validation_split",
]
