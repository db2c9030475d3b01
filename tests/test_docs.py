"""The documentation: the README's links resolve, and the Sphinx site builds with warnings as errors."""

import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_relative_link_of_the_readme_names_a_file_of_the_repository():
  links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
  relative = [link for link in links if "://" not in link]
  assert relative, "the README links to no page"
  assert [link for link in relative if not (REPO / link).exists()] == []


@pytest.mark.slow
def test_the_site_builds_with_warnings_as_errors(tmp_path):
  pytest.importorskip("sphinx")
  pytest.importorskip("myst_parser")
  pytest.importorskip("furo")
  built = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                          str(REPO / "docs"), str(tmp_path / "html")], capture_output=True, text=True, check=False)
  assert built.returncode == 0, built.stderr
  api = (tmp_path / "html" / "api" / "losses.html").read_text()
  assert "mtcl_jax.losses.supcon" in api  # the reference is rendered from the docstrings, not left empty
  assert (tmp_path / "html" / "_images" / "scarcity_accuracy.png").exists()
