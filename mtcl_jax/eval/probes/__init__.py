"""Probes on frozen features: softmax regression, linear SVM, one-hidden-layer MLP and cosine kNN.

Every probe follows one protocol:

1. **Standardise** (linear, svm, mlp) with the mean and standard deviation of the rows the probe is fit on
   (a constant feature is centred and left unscaled). Callers pass raw encoder outputs; test rows never
   contribute statistics. The kNN probe instead compares raw features by cosine (see ``_knn``).
2. **Select** the probe's hyper-parameter on a stratified, seeded validation split of the *training* rows
   (``val_fraction`` of each class, :func:`mtcl_jax.splits.stratified_rows`): fit on the rest for each grid
   value, keep the value with the best validation accuracy. Ties go to the earlier grid value; the default
   grids list the strongest regularisation first. Test labels are never an input of fitting.
3. **Refit** on all training rows with the chosen value.

With so few rows that no class can spare one for validation (under label scarcity, e.g. two labelled rows per
class), the linear, svm and knn probes fit :data:`FEW_ROWS_DEFAULTS` (scikit-learn's defaults C = 1, and k = 1)
and say so in ``hparams["chosen_by"]``; the mlp probe, which needs held-out rows for early stopping, raises.

A probe family is one :class:`ProbeFamily` record (name, hyper-parameter, default grid, few-rows default, fit,
select, scores), one module each: ``_linear`` (linear and svm: ``optax.lbfgs`` mapped over the C grid),
``_mlp`` and ``_knn``; ``_fitting`` holds the registry and the protocol. Each family fits its whole grid in one
compiled program per task shape, with the grid as a traced array, so nothing compiles per hyper-parameter. Rows
are padded (with weight 0) to a row bucket and classes (masked) to a multiple of ``CLASS_BUCKET``, so tasks of
similar shape share one compiled program.
"""

from mtcl_jax.eval.probes._base import CLASS_BUCKET, Probe, ProbeFamily
from mtcl_jax.eval.probes._fitting import (
    DEFAULT_GRIDS,
    FAMILIES,
    FEW_ROWS_DEFAULTS,
    HPARAM_NAMES,
    PROBE_KINDS,
    evaluate_task,
    fit_probe,
    validation_split,
)
from mtcl_jax.eval.probes._knn import KNN_TEMPERATURE
from mtcl_jax.eval.probes._linear import LBFGS_GRADIENT_TOLERANCE, LINEAR_GRID_BATCH_SIZE, LINEAR_ROW_BUCKET
from mtcl_jax.eval.probes._mlp import MLP_MAX_STEPS

__all__ = [
    "CLASS_BUCKET",
    "DEFAULT_GRIDS",
    "FAMILIES",
    "FEW_ROWS_DEFAULTS",
    "HPARAM_NAMES",
    "KNN_TEMPERATURE",
    "LBFGS_GRADIENT_TOLERANCE",
    "LINEAR_GRID_BATCH_SIZE",
    "LINEAR_ROW_BUCKET",
    "MLP_MAX_STEPS",
    "PROBE_KINDS",
    "Probe",
    "ProbeFamily",
    "evaluate_task",
    "fit_probe",
    "validation_split",
]
