"""Evaluation of frozen features: probes, metrics, Δm, reports, result tables and plots.

``evaluate_task`` is the entry point the trainer calls once per task; ``metrics`` holds the scores and Δm;
``report``, ``tables`` and ``plots`` turn results into markdown, README tables and PNG figures.
"""

from mtcl_jax.eval import metrics
from mtcl_jax.eval.probes import DEFAULT_GRIDS
from mtcl_jax.eval.probes import HPARAM_NAMES
from mtcl_jax.eval.probes import PROBE_KINDS
from mtcl_jax.eval.probes import Probe
from mtcl_jax.eval.probes import evaluate_task
from mtcl_jax.eval.probes import fit_probe
from mtcl_jax.eval.probes import validation_split
