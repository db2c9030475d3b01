"""Markdown rendering of a run's report (the content of ``report.json``)."""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

_MISSING = "—"
# A summary or config value longer than this is summarised rather than printed in a table cell.
_MAX_CELL_CHARS = 80


def _format_number(value: Any) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return _MISSING if value is None else str(value)
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return f"{value:.2f}" if isinstance(value, float) else str(value)


def _format_cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.6g}"
  if isinstance(value, (list, tuple, dict)):
    text = json.dumps(value, default=str)
    if len(text) > _MAX_CELL_CHARS:
      return f"({type(value).__name__} of {len(value)})"
    return text
  return str(value)


def _escape(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
  rows = []
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      rows.extend(_flatten(value, f"{name}."))
    else:
      rows.append((name, value))
  return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows]
  return lines + [""]


def _accuracy_and_f1(scores: Mapping[str, Any]) -> str:
  return f"{_format_number(scores.get('accuracy'))} / {_format_number(scores.get('macro_f1'))}"


def render_markdown_report(report: Mapping[str, Any], *, title: str = "Evaluation report") -> str:
  """Renders a report dict as markdown: task scores, task × probe table, chosen hyper-parameters, config.

  Args:
    report: ``{"tasks": {name: {"accuracy", "macro_f1", "probes": {probe: {"accuracy", "macro_f1",
      "hparams", ...}}}}, "config": {...}, ...}``; other top-level entries are listed as a summary.
    title: the document's heading.

  Returns:
    The markdown text.
  """
  if not isinstance(report, Mapping):
    raise ValueError(f"report must be a mapping; got {type(report).__name__}")
  tasks = report.get("tasks", {})
  if not isinstance(tasks, Mapping) or not all(isinstance(task, Mapping) for task in tasks.values()):
    raise ValueError("report['tasks'] must map each task name to a mapping of its scores")
  lines = [f"# {title}", ""]

  if tasks:
    lines += ["## Tasks (test set, percent)", ""]
    lines += _table(["task", "accuracy", "macro-F1"],
                    [[name, _format_number(scores.get("accuracy")), _format_number(scores.get("macro_f1"))]
                     for name, scores in tasks.items()])

  probe_names = list(dict.fromkeys(probe for scores in tasks.values() for probe in scores.get("probes", {})))
  if probe_names:
    lines += ["## Probes (accuracy / macro-F1, percent)", ""]
    rows = []
    for name, scores in tasks.items():
      probes = scores.get("probes", {})
      rows.append([name] + [_accuracy_and_f1(probes[probe]) if probe in probes else _MISSING
                            for probe in probe_names])
    lines += _table(["task"] + probe_names, rows)

    lines += ["## Chosen hyper-parameters", ""]
    rows = []
    for name, scores in tasks.items():
      for probe, result in scores.get("probes", {}).items():
        hparams = ", ".join(f"{key}={_format_cell(value)}" for key, value in result.get("hparams", {}).items())
        rows.append([name, probe, hparams or _MISSING, _format_number(result.get("validation_accuracy"))])
    lines += _table(["task", "probe", "hyper-parameters", "validation accuracy"], rows)

  summary = _flatten({key: value for key, value in report.items() if key not in ("tasks", "config")})
  if summary:
    lines += ["## Summary", ""]
    lines += _table(["entry", "value"], [[key, _format_cell(value)] for key, value in summary])

  config = report.get("config")
  if isinstance(config, Mapping) and config:
    lines += ["## Config", ""]
    lines += _table(["key", "value"], [[key, _format_cell(value)] for key, value in _flatten(config)])
  return "\n".join(lines)


def write_markdown_report(report: Mapping[str, Any], path: str | os.PathLike) -> pathlib.Path:
  """Writes ``render_markdown_report(report)`` to ``path`` (parents created).

  Args:
    report: the report dict (see ``render_markdown_report``).
    path: the markdown file to write.

  Returns:
    The path written.
  """
  path = pathlib.Path(path)
  text = render_markdown_report(report)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")
  return path
