"""Results files (mean ± std over seeds per dataset, method and metric) and the markdown tables made from them
(the results pages under ``docs/results/``, written by ``experiments/reproduce.py``).

A results file is JSON, ``{"rows": [row, ...], "provenance": {...}}``, one row per (dataset, method, metric)::

  {"dataset": "digits", "method": "supcon", "metric": "accuracy", "mean": 98.9, "std": 0.2,
   "seeds": [0, 1, 2], "values": [98.7, 99.1, 98.9]}

Scores are in percent; ``values`` are the per-seed scores in the order of ``seeds``, and ``mean``/``std`` their
mean and sample standard deviation (0 for one seed, see ``metrics.mean_std``), checked against them on every
read, so a ``± 0.00`` can be checked. :func:`summary_row` always writes ``values``; a results file written before
they were kept has rows without them, which load, and whose pages say so (:func:`has_values`). A row may also
carry ``"p_value"``: a paired test across the same seeds against the table's baseline
(``metrics.paired_p_value``; for Δm, against 0), shown beside the number as ``(p=0.03)``. ``provenance``
(optional, free-form JSON) says how the rows were made: the command, the config and overrides, the package
versions (``experiments/reproduce.py`` writes them).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from mtcl_jax.eval import metrics

METRICS: tuple[str, ...] = ("accuracy", "macro_f1", "delta_m", "gradient_cosine")
_METRIC_HEADERS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "delta_m": "Δm",
                   "gradient_cosine": "gradient cosine"}
_ROW_KEYS = frozenset({"dataset", "method", "metric", "mean", "std", "seeds"})
_FILE_KEYS = frozenset({"rows", "provenance"})
# mean and std are stored to two decimals, values to four: a row whose summary disagrees with its values by more
# than the rounding was edited by hand or computed from other values.
_SUMMARY_DECIMALS, _VALUE_DECIMALS = 2, 4
_SUMMARY_TOLERANCE = 0.5 * 10.0**-_SUMMARY_DECIMALS + 10.0**-_VALUE_DECIMALS
_OPTIONAL_KEYS = frozenset({"p_value", "values"})
_MISSING = "—"


def _check_values(index: int, row: Mapping[str, Any]) -> list[float]:
  values, seeds = row["values"], row["seeds"]
  if (not isinstance(values, Sequence) or isinstance(values, str) or len(values) != len(seeds)
      or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
    raise ValueError(f"results row {index}: values must be one finite number per seed ({len(seeds)}); "
                     f"got {values!r}")
  mean, std = metrics.mean_std(values)
  for key, expected in (("mean", mean), ("std", std)):
    if abs(row[key] - expected) > _SUMMARY_TOLERANCE:
      raise ValueError(f"results row {index} ({row['dataset']}, {row['method']}, {row['metric']}): {key} "
                       f"{row[key]} is not the {key} of its values {list(values)} ({expected:.4f})")
  return [float(v) for v in values]


def _check_row(index: int, row: Any) -> dict[str, Any]:
  if not isinstance(row, Mapping):
    raise ValueError(f"results row {index} must be a mapping; got {type(row).__name__}")
  if not _ROW_KEYS <= set(row) <= _ROW_KEYS | _OPTIONAL_KEYS:
    raise ValueError(f"results row {index} must have the keys {sorted(_ROW_KEYS)} (and optionally "
                     f"{sorted(_OPTIONAL_KEYS)}); got {sorted(row)}")
  for key in ("dataset", "method"):
    if not isinstance(row[key], str) or not row[key]:
      raise ValueError(f"results row {index}: {key} must be a non-empty string; got {row[key]!r}")
  if row["metric"] not in METRICS:
    raise ValueError(f"results row {index}: metric must be one of {METRICS}; got {row['metric']!r}")
  for key in ("mean", "std"):
    value = row[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
      raise ValueError(f"results row {index}: {key} must be a finite number; got {value!r}")
  if row["std"] < 0:
    raise ValueError(f"results row {index}: std must be >= 0; got {row['std']}")
  seeds = row["seeds"]
  if (not isinstance(seeds, Sequence) or isinstance(seeds, str) or not seeds
      or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds)
      or len(set(seeds)) != len(seeds)):
    raise ValueError(f"results row {index}: seeds must be a non-empty list of distinct ints; got {seeds!r}")
  checked = {"dataset": row["dataset"], "method": row["method"], "metric": row["metric"],
             "mean": float(row["mean"]), "std": float(row["std"]), "seeds": list(seeds)}
  if "values" in row:
    checked["values"] = _check_values(index, row)
  if "p_value" in row:
    p_value = row["p_value"]
    if isinstance(p_value, bool) or not isinstance(p_value, (int, float)) or not 0.0 <= p_value <= 1.0:
      raise ValueError(f"results row {index}: p_value must be a number in [0, 1]; got {p_value!r}")
    checked["p_value"] = float(p_value)
  return checked


def validate_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Checks results rows and returns them as plain dicts.

  Args:
    rows: results rows (see the module docstring).

  Returns:
    The rows in order, with ``mean``/``std`` as floats and ``seeds`` as a list.

  Raises:
    ValueError: naming the row and field that is wrong, or a repeated (dataset, method, metric).
  """
  if isinstance(rows, (str, Mapping)) or not isinstance(rows, Sequence):
    raise ValueError(f"rows must be a sequence of mappings; got {type(rows).__name__}")
  checked = [_check_row(index, row) for index, row in enumerate(rows)]
  seen = set()
  for row in checked:
    key = (row["dataset"], row["method"], row["metric"])
    if key in seen:
      raise ValueError(f"results rows repeat dataset={key[0]!r} method={key[1]!r} metric={key[2]!r}")
    seen.add(key)
  return checked


def summary_row(dataset: str, method: str, metric: str, values: Sequence[float], seeds: Sequence[int], *,
                p_value: float | None = None) -> dict[str, Any]:
  """One results row from per-seed scores: their mean and sample std, and the scores themselves.

  Args:
    dataset: the row's dataset (or regime) label.
    method: the row's method label.
    metric: one of ``METRICS``.
    values: the score of each seed, in the order of ``seeds``.
    seeds: the seeds.
    p_value: an optional paired test against the table's baseline.

  Returns:
    The row, mean and std rounded to two decimals, the values to four.

  Examples:
    >>> summary_row("digits", "supcon", "accuracy", [98.7, 99.1, 98.9], [0, 1, 2])["std"]
    0.2
  """
  mean, std = metrics.mean_std(values)
  row: dict[str, Any] = {"dataset": dataset, "method": method, "metric": metric,
                         "mean": round(mean, _SUMMARY_DECIMALS), "std": round(std, _SUMMARY_DECIMALS),
                         "seeds": list(seeds), "values": [round(float(v), _VALUE_DECIMALS) for v in values]}
  if p_value is not None:
    row["p_value"] = round(float(p_value), 4)
  return validate_rows([row])[0]


def has_values(rows: Sequence[Mapping[str, Any]]) -> bool:
  """Whether every row keeps its per-seed ``values`` (results files written before they were kept do not)."""
  return all("values" in row for row in rows)


def write_results(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                  provenance: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Validates ``rows`` and writes them as a JSON results file (parents created), replacing it atomically.

  Args:
    rows: results rows (see the module docstring).
    path: the file to write.
    provenance: how the rows were made (JSON-serialisable), stored beside them.

  Returns:
    The path written.
  """
  checked = validate_rows(rows)
  content: dict[str, Any] = {"rows": checked}
  if provenance is not None:
    content["provenance"] = dict(provenance)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f".{path.name}.tmp")
  temporary.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
  temporary.replace(path)
  return path


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads and validates a results file written by :func:`write_results` (``reproduce.py --render-only`` reads
  the committed ones with it).

  Args:
    path: the JSON results file.

  Returns:
    Its rows, validated.
  """
  return validate_rows(_read(path)["rows"])


def load_provenance(path: str | os.PathLike) -> dict[str, Any]:
  """The ``provenance`` of a results file written by :func:`write_results` (``{}`` when it has none).

  Args:
    path: the JSON results file.
  """
  return dict(_read(path).get("provenance", {}))


def _read(path: str | os.PathLike) -> Mapping[str, Any]:
  content = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  if not isinstance(content, Mapping) or "rows" not in content or not set(content) <= _FILE_KEYS:
    raise ValueError(f"{path} must hold a JSON object with the key 'rows' (and optionally 'provenance')")
  if not isinstance(content.get("provenance", {}), Mapping):
    raise ValueError(f"{path}: 'provenance' must be a JSON object")
  return content


def _seed_count(cells: Mapping[str, Mapping[str, Any]]) -> str:
  counts = sorted({len(row["seeds"]) for row in cells.values()})
  return "/".join(str(count) for count in counts)


def markdown_table(rows: Sequence[Mapping[str, Any]], *, anchors: Mapping[str, str] | None = None) -> str:
  """Renders results rows as a markdown table with one line per (dataset, method).

  Args:
    rows: results rows (see the module docstring).
    anchors: optional reference numbers per dataset, e.g. ``{"digits": "SVC-RBF 98.70 / logistic
      97.04"}``, shown in an ``anchor`` column on the first line of their dataset.

  Returns:
    The table, datasets and methods in order of first appearance, each metric as ``mean ± std`` with
    two decimals; metric columns that no row fills are left out, and ``seeds`` counts the seeds.

  Examples:
    >>> print(markdown_table([summary_row("digits", "supcon", "accuracy", [98.7, 99.1, 98.9], [0, 1, 2])]))
    | dataset | method | accuracy | seeds |
    |---|---|---|---|
    | digits | supcon | 98.90 ± 0.20 | 3 |
  """
  checked = validate_rows(rows)
  if not checked:
    raise ValueError("markdown_table needs at least one results row")
  metric_columns = [metric for metric in METRICS if any(row["metric"] == metric for row in checked)]
  grouped: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
  for row in checked:
    grouped.setdefault(row["dataset"], {}).setdefault(row["method"], {})[row["metric"]] = row

  header = ["dataset", "method"] + [_METRIC_HEADERS[metric] for metric in metric_columns] + ["seeds"]
  if anchors is not None:
    header.append("anchor")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for dataset, methods in grouped.items():
    for position, (method, cells) in enumerate(methods.items()):
      line = [dataset, method]
      for metric in metric_columns:
        cell = cells.get(metric)
        text = f"{cell['mean']:.2f} ± {cell['std']:.2f}" if cell else _MISSING
        if cell and "p_value" in cell:
          text += f" (p={cell['p_value']:.2f})"
        line.append(text)
      line.append(_seed_count(cells))
      if anchors is not None:
        line.append(anchors.get(dataset, "") if position == 0 else "")
      lines.append("| " + " | ".join(text.replace("|", "\\|") for text in line) + " |")
  return "\n".join(lines)
