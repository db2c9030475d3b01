"""The default tier keeps a representative case of a costly parametrisation; the slow tier (``-m slow``, run in
CI) runs the rest. Nearly all of a case's cost is XLA compiling its programs, so each case left out of the default
tier saves its whole compile."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import pytest


def default_tier(cases: Iterable[Any], keep: Collection[Any]) -> list[Any]:
  """``cases`` as pytest params, those not in ``keep`` marked slow (a tuple case is unpacked into the params)."""
  params = []
  for case in cases:
    values = case if isinstance(case, tuple) else (case,)
    marks = () if case in keep else pytest.mark.slow
    params.append(pytest.param(*values, marks=marks))
  return params
