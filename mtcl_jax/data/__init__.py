"""Data: offline TFDS datasets, task specs, multi-task batches and augmented views.

The whole path in four calls::

    from mtcl_jax import data, parallel

    tasks = data.load_tasks("digits+japanese_vowels")           # normalised arrays, task ids 0..T-1
    batcher = data.MultiTaskBatcher(tasks, batch_sizes=64, seed=0)
    batch = batcher.place(batcher.local_batch(step), parallel.make_mesh())
    views = data.augment.make_views(key, batch["digits"]["x"], modality="image")   # [2, B, 8, 8, 1]

``load_arrays(name, split)`` returns plain unnormalised ``(x, y)``; ``load_lengths`` the true lengths of a
sequence dataset (also ``TaskData.train["mask"].sum(1)``). See ``sources`` for the data directory
(``$MTCL_DATA_DIR``) and how standard TFDS datasets are found offline.

Your own arrays become a task in one call, then compose like any dataset::

    data.register_task("wine", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, modality="tabular")
    tasks = data.load_tasks("digits+wine")           # normalised with wine's train statistics

Label scarcity: ``data.hide_labels(tasks, 0.05, seed=0, keep_unlabelled=True)`` keeps a stratified 5% of each
task's training labels and the other inputs as ``TaskData.unlabelled`` (see ``scarcity``).
"""

from mtcl_jax import _extras

with _extras.requires("data", "mtcl_jax.data"):
  from mtcl_jax.data import augment
  from mtcl_jax.data.batching import HIDDEN_LABEL, MultiTaskBatcher, batch_sizes_from_weights, iterate_split
  from mtcl_jax.data.scarcity import hide_labels, holdout_validation, stratified_rows
  from mtcl_jax.data.sources import (
    DATA_DIR_ENV,
    MODALITIES,
    OFFLINE_DATASETS,
    CorruptDatasetError,
    DatasetNotPreparedError,
    UnknownDatasetError,
    dataset_spec,
    load_arrays,
    load_lengths,
    resolve_data_dir,
  )
  from mtcl_jax.data.tasks import COMPOSITIONS, Task, TaskData, load_tasks, register_task

__all__ = [
    "augment",
    "HIDDEN_LABEL",
    "MultiTaskBatcher",
    "batch_sizes_from_weights",
    "iterate_split",
    "CorruptDatasetError",
    "DATA_DIR_ENV",
    "DatasetNotPreparedError",
    "MODALITIES",
    "OFFLINE_DATASETS",
    "UnknownDatasetError",
    "dataset_spec",
    "load_arrays",
    "load_lengths",
    "resolve_data_dir",
    "COMPOSITIONS",
    "Task",
    "TaskData",
    "load_tasks",
    "register_task",
    "hide_labels",
    "holdout_validation",
    "stratified_rows",
]
