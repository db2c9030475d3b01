"""PNG figures of a run: training curves, a 2-D PCA of the shared features, and the task-affinity matrices.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas directly, never through ``pyplot``:
no global figure state, no display needed, nothing for the caller to close.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jax.typing import ArrayLike
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOSS_FIGURE = "loss_curves.png"
ACCURACY_FIGURE = "task_accuracy.png"
_DPI = 120


def _is_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
  points = [(float(row["step"]), float(row[key])) for row in history if _is_number(row.get(key))]
  return [step for step, _ in points], [value for _, value in points]


def _save(figure: Figure, path: pathlib.Path) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  FigureCanvasAgg(figure)
  figure.savefig(path, dpi=_DPI)
  return path


def plot_training_curves(
    history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
) -> list[pathlib.Path]:
  """Plots the losses and the per-task evaluation accuracy of a run against the step.

  Args:
    history: logged rows, each with an int ``"step"`` and any of: losses (keys containing ``"loss"`` that
      do not start with ``"eval/"``, e.g. ``"loss"``, ``"contrastive_loss"``) and per-task accuracy
      (``"eval/<task>/accuracy"``, in percent). A key may be absent from rows where it was not logged.
    out_dir: directory for the figures (created).

  Returns:
    The PNGs written, in order: ``loss_curves.png`` (if any loss was logged), ``task_accuracy.png`` (if any
    accuracy was logged).
  """
  for index, row in enumerate(history):
    if not isinstance(row, Mapping) or not _is_number(row.get("step")):
      raise ValueError(f"history row {index} must be a mapping with a numeric 'step'; got {row!r}")
  keys = list(dict.fromkeys(key for row in history for key in row))
  loss_keys = [key for key in keys if "loss" in key and not key.startswith("eval/")]
  accuracy_keys = [key for key in keys
                   if key.startswith("eval/") and key.endswith("/accuracy") and key.count("/") == 2]
  out_dir = pathlib.Path(out_dir)
  written = []

  panels = [
      (loss_keys, LOSS_FIGURE, "loss", "Training losses", lambda key: key),
      (accuracy_keys, ACCURACY_FIGURE, "accuracy (%)", "Per-task accuracy", lambda key: key.split("/")[1]),
  ]
  for series_keys, file_name, y_label, title, legend_name in panels:
    curves = [(legend_name(key), *_series(history, key)) for key in series_keys]
    curves = [curve for curve in curves if curve[1]]
    if not curves:
      continue
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    for name, steps, values in curves:
      axes.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
    axes.set(xlabel="step", ylabel=y_label, title=title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    written.append(_save(figure, out_dir / file_name))
  return written


def plot_feature_pca(
    features: ArrayLike, task_names: Sequence[str], labels: ArrayLike, out_path: str | os.PathLike
) -> pathlib.Path:
  """Scatters the shared features on their first two principal components, by task and by class.

  Args:
    features: ``[N, F]`` shared (trunk) features of rows from every task.
    task_names: ``N`` task names, the task of each row.
    labels: ``[N]`` integer class ids (within each row's task).
    out_path: the PNG to write (parents created).

  Returns:
    The path written. Left panel: coloured by task; right panel: coloured by class, marker by task.
  """
  features = np.asarray(features, dtype=np.float64)
  labels = np.asarray(labels)
  row_tasks = np.asarray([str(name) for name in task_names])
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features must have shape [N >= 2, F]; got {features.shape}")
  if row_tasks.shape != (features.shape[0],) or labels.shape != (features.shape[0],):
    raise ValueError(f"task_names and labels must have {features.shape[0]} entries (one per row); got "
                     f"{row_tasks.shape} and {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integer class ids; got dtype {labels.dtype}")

  # PCA by SVD of the centred features: the right singular vectors are the principal axes.
  centred = features - features.mean(axis=0, keepdims=True)
  _, singular_values, axes_t = np.linalg.svd(centred, full_matrices=False)
  num_components = min(2, axes_t.shape[0])
  projected = np.zeros((features.shape[0], 2))
  projected[:, :num_components] = centred @ axes_t[:num_components].T
  variance = np.square(singular_values)
  explained = variance[:2] / max(variance.sum(), np.finfo(np.float64).tiny) * 100.0
  explained = np.pad(explained, (0, 2 - explained.size))

  figure = Figure(figsize=(11.0, 4.8), layout="constrained")
  by_task, by_class = figure.subplots(1, 2)
  tasks = list(dict.fromkeys(row_tasks.tolist()))
  markers = "os^Dv<>pP*"
  for task in tasks:
    rows = task_names == task
    by_task.scatter(projected[rows, 0], projected[rows, 1], s=6, alpha=0.6, label=task)
  # One colour scale for every task: class ids are shared across tasks, markers tell the tasks apart. A
  # qualitative map gives each class its own colour while there are few enough classes.
  lowest, highest = int(labels.min()), int(labels.max())
  num_colours = next((size for size in (10, 20) if highest - lowest < size), highest - lowest + 1)
  colour_map = {10: "tab10", 20: "tab20"}.get(num_colours, "turbo")
  for index, task in enumerate(tasks):
    rows = task_names == task
    scatter = by_class.scatter(projected[rows, 0], projected[rows, 1], c=labels[rows], cmap=colour_map,
                               vmin=lowest - 0.5, vmax=lowest + num_colours - 0.5, s=6, alpha=0.6,
                               marker=markers[index % len(markers)], label=task)
  figure.colorbar(scatter, ax=by_class, label="class")
  for axes, title in ((by_task, "by task"), (by_class, "by class (marker: task)")):
    axes.set(xlabel=f"PC1 ({explained[0]:.1f}%)", ylabel=f"PC2 ({explained[1]:.1f}%)", title=title)
    axes.legend(fontsize="small", markerscale=2)
  figure.suptitle("PCA of shared features")
  return _save(figure, pathlib.Path(out_path))


def plot_task_affinity(relations: Mapping[str, Any], out_path: str | os.PathLike) -> pathlib.Path:
  """Heatmaps of the task-affinity matrices over the last quarter of training, and their pairs over the steps.

  Args:
    relations: ``report.json``'s ``task_affinity`` (:func:`mtcl_jax.train.affinity.task_affinity`): ``names``,
      ``steps`` and per measure (``cosine``, ``lookahead``) one ``[T, T]`` matrix per step.
    out_path: the PNG to write.

  Returns:
    ``out_path``: one column per measure, the mean matrix (annotated) above, each pair's curve below.
  """
  names, steps = list(relations["names"]), np.asarray(relations["steps"], np.float64)
  measures = [measure for measure in ("cosine", "lookahead") if measure in relations]
  if not measures or not len(steps):
    raise ValueError("task_affinity holds no matrix to plot")
  figure = Figure(figsize=(5.2 * len(measures), 9.0), layout="constrained")
  axes = figure.subplots(2, len(measures), squeeze=False)
  for column, measure in enumerate(measures):
    matrices = np.asarray(relations[measure], np.float64)
    last = matrices[-max(1, len(matrices) // 4):].mean(axis=0)
    heat, curves = axes[0][column], axes[1][column]
    limit = max(1e-6, float(np.max(np.abs(last)))) if measure == "lookahead" else 1.0
    image = heat.imshow(last, cmap="RdBu", vmin=-limit, vmax=limit)
    for i in range(len(names)):
      for j in range(len(names)):
        text = f"{last[i, j]:.2f}" if measure == "cosine" else f"{last[i, j]:.2g}"
        heat.text(j, i, text, ha="center", va="center", fontsize="small")
    heat.set_xticks(range(len(names)), labels=names, rotation=45, ha="right", fontsize="small")
    heat.set_yticks(range(len(names)), labels=names, fontsize="small")
    title = "gradient cosine" if measure == "cosine" else "lookahead affinity (row: step on, column: loss)"
    heat.set_title(f"{title}, last quarter of training", fontsize="medium")
    figure.colorbar(image, ax=heat, shrink=0.8)
    for i, a in enumerate(names):
      for j, b in enumerate(names):
        if (measure == "cosine" and i < j) or (measure != "cosine" and i != j):
          curves.plot(steps, matrices[:, i, j], label=f"{a} / {b}" if measure == "cosine" else f"{a} → {b}")
    curves.axhline(0.0, color="black", linewidth=0.8)
    curves.set(xlabel="step", ylabel=measure)
    curves.grid(alpha=0.3)
    curves.legend(fontsize="x-small")
  return _save(figure, pathlib.Path(out_path))
