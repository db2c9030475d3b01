"""Markdown reports, results tables and PNG figures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtcl_jax.eval import plots, report, tables

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _row(dataset, method, metric, mean, std, seeds, values):
  return {"dataset": dataset, "method": method, "metric": metric, "mean": mean, "std": std, "seeds": seeds,
          "values": values}


def _rows():
  return [
      _row("digits", "supcon", "accuracy", 98.904, 0.2, [0, 1, 2], [98.704, 99.104, 98.904]),
      _row("digits", "supcon", "macro_f1", 98.8, 0.25, [0, 1, 2], [98.55, 99.05, 98.8]),
      _row("digits", "single", "accuracy", 97.0, 0.0, [0], [97.0]),
      _row("all", "supcon", "delta_m", 0.61, 0.1, [0, 1, 2], [0.51, 0.71, 0.61]),
  ]


def test_results_round_trip_with_provenance(tmp_path):
  provenance = {"command": "python experiments/reproduce.py --tables digits", "versions": {"jax": "0.10.2"}}
  path = tables.write_results(_rows(), tmp_path / "results" / "digits.json", provenance=provenance)
  assert json.loads(path.read_text()) == {"rows": _rows(), "provenance": provenance}
  assert tables.load_results(path) == _rows() and tables.load_provenance(path) == provenance
  assert not list(path.parent.glob(".*.tmp"))  # written beside and renamed over
  tables.write_results(_rows(), path)
  assert tables.load_provenance(path) == {}
  path.write_text(json.dumps({"rows": _rows(), "extra": 1}))
  with pytest.raises(ValueError, match="the key 'rows'"):
    tables.load_results(path)


def test_summary_row_keeps_the_per_seed_values_its_mean_and_std_come_from():
  values = [99.259259, 99.259259, 99.444444]
  row = tables.summary_row("digits", "supcon", "accuracy", values, [0, 1, 2], p_value=0.123456)
  assert row["values"] == [99.2593, 99.2593, 99.4444] and row["p_value"] == 0.1235
  assert row["mean"] == pytest.approx(np.mean(values), abs=0.005)
  assert row["std"] == pytest.approx(np.std(values, ddof=1), abs=0.005)
  assert tables.has_values([row]) and not tables.has_values([{k: v for k, v in row.items() if k != "values"}])


@pytest.mark.parametrize(
    "change",
    [
        {"metric": "f1"},
        {"mean": float("nan")},
        {"std": -1.0},
        {"seeds": []},
        {"seeds": [0, 0]},
        {"dataset": ""},
        {"extra": 1},
        {"values": [98.7, 99.1]},  # one per seed
        {"values": [98.7, float("inf"), 98.9]},
        {"mean": 97.0},  # not the mean of its values
        {"std": 0.0},  # a "± 0.00" that its values contradict
    ],
)
def test_results_rows_are_validated(tmp_path, change):
  rows = _rows()
  rows[0] = {**rows[0], **change}
  with pytest.raises(ValueError, match="row 0"):
    tables.write_results(rows, tmp_path / "results.json")
  assert not (tmp_path / "results.json").exists()


def test_results_reject_repeated_rows_and_bad_files(tmp_path):
  with pytest.raises(ValueError, match="repeat"):
    tables.validate_rows(_rows() + [_rows()[0]])
  with pytest.raises(ValueError, match="rows must be a sequence"):
    tables.validate_rows({"dataset": "digits"})


def test_markdown_table_with_anchors():
  text = tables.markdown_table(_rows(), anchors={"digits": "SVC-RBF 98.70 / logistic 97.04"})
  assert text.splitlines() == [
      "| dataset | method | accuracy | macro-F1 | Δm | seeds | anchor |",
      "|---|---|---|---|---|---|---|",
      "| digits | supcon | 98.90 ± 0.20 | 98.80 ± 0.25 | — | 3 | SVC-RBF 98.70 / logistic 97.04 |",
      "| digits | single | 97.00 ± 0.00 | — | — | 1 |  |",
      "| all | supcon | — | — | 0.61 ± 0.10 | 3 |  |",
  ]
  assert "anchor" not in tables.markdown_table(_rows())


def test_markdown_report(tmp_path):
  content = {
      "tasks": {
          "digits": {"accuracy": 97.2222, "macro_f1": 97.25, "probes": {
              "linear": {"accuracy": 97.2222, "macro_f1": 97.25, "hparams": {"C": 0.1},
                         "validation_accuracy": 94.4},
              "knn": {"accuracy": 97.59, "macro_f1": 97.58, "hparams": {"k": 1, "temperature": 0.07}},
          }},
          "japanese_vowels": {"accuracy": 98.1, "macro_f1": 97.9, "probes": {
              "linear": {"accuracy": 98.1, "macro_f1": 97.9, "hparams": {"C": 1.0}}}},
      },
      "delta_m": 0.61,
      "config": {"seed": 0, "optimizer": {"name": "adamw", "learning_rate": 0.001}},
  }
  path = report.write_markdown_report(content, tmp_path / "out" / "report.md")
  text = path.read_text()
  assert "| digits | 97.22 / 97.25 | 97.59 / 97.58 |" in text
  assert "| japanese_vowels | 98.10 / 97.90 | — |" in text
  assert "| digits | linear | C=0.1 | 94.40 |" in text
  assert "| delta_m | 0.61 |" in text
  assert "| optimizer.learning_rate | 0.001 |" in text
  with pytest.raises(ValueError, match="tasks"):
    report.write_markdown_report({"tasks": {"digits": 97.0}}, tmp_path / "bad.md")


def test_training_curves_write_pngs(tmp_path):
  history = [{"step": step, "loss": 2.0 / (step + 1), "contrastive_loss": 1.0 / (step + 1)}
             for step in range(0, 50, 5)]
  history += [{"step": step, "eval/digits/accuracy": 90.0 + step / 10, "eval/vowels/accuracy": 80.0 + step / 5}
              for step in (10, 30, 50)]
  paths = plots.plot_training_curves(history, tmp_path / "figures")
  assert [path.name for path in paths] == [plots.LOSS_FIGURE, plots.ACCURACY_FIGURE]
  for path in paths:
    assert path.read_bytes().startswith(PNG_SIGNATURE)
  # No accuracy was logged: that figure is skipped, not drawn empty.
  loss_only = plots.plot_training_curves(history[:3], tmp_path / "losses")
  assert [path.name for path in loss_only] == [plots.LOSS_FIGURE]
  assert plots.plot_training_curves([], tmp_path / "empty") == []
  with pytest.raises(ValueError, match="step"):
    plots.plot_training_curves([{"loss": 1.0}], tmp_path / "bad")


def test_feature_pca_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  features = np.concatenate([rng.normal(size=(40, 16)), rng.normal(loc=3.0, size=(30, 16))])
  task_names = ["digits"] * 40 + ["vowels"] * 30
  labels = np.concatenate([rng.integers(0, 10, 40), rng.integers(0, 9, 30)])
  path = plots.plot_feature_pca(features, task_names, labels, tmp_path / "pca" / "features.png")
  assert path.read_bytes().startswith(PNG_SIGNATURE)
  with pytest.raises(ValueError, match="one per row"):
    plots.plot_feature_pca(features, task_names[:-1], labels, tmp_path / "bad.png")
