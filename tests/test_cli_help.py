"""`focusing --help` builds every command's parser without importing torch, trimesh or scipy (torch alone is 5 s
on our CPU box)."""

from __future__ import annotations

import subprocess
import sys


def test_building_the_parser_imports_no_torch():
    code = "import sys; from focusing.cli import build_parser; build_parser(); print(sorted(m for m in " \
           "('torch', 'trimesh', 'scipy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_benchmark_method_names_are_the_methods():
    from focusing.commands.benchmark import METHOD_NAMES
    from focusing.eval.baselines import METHODS

    assert sorted(METHOD_NAMES) == sorted(METHODS)
