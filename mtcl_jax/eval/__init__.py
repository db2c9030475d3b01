"""Evaluation of frozen features: probes, metrics, Δm, reports, result tables and plots.

``evaluate_task`` is the entry point the trainer calls once per task; ``metrics`` holds the scores and Δm.
The sub-modules ``report``, ``tables`` and ``plots`` (which imports matplotlib) turn results into markdown,
README tables and PNG figures; they are imported by name, e.g. ``from mtcl_jax.eval import plots``.
"""

from mtcl_jax.eval import metrics
from mtcl_jax.eval.probes import DEFAULT_GRIDS
from mtcl_jax.eval.probes import HPARAM_NAMES
from mtcl_jax.eval.probes import PROBE_KINDS
from mtcl_jax.eval.probes import Probe
from mtcl_jax.eval.probes import evaluate_task
from mtcl_jax.eval.probes import fit_probe
from mtcl_jax.eval.probes import validation_split
