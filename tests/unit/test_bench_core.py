"""The core benchmark runs (quick mode) and reports every figure."""

from __future__ import annotations

import json

import pytest

from nestmmu import bench_core

FIGURES = ("dict_lookup", "tlb_hit", "shadow_walk_hit", "nested_fault", "demo_workload")


def test_quick_run_reports_positive_figures(capsys: pytest.CaptureFixture[str]) -> None:
    out = bench_core.run(json_out=True, quick=True)
    for name in FIGURES:
        assert out[name]["ops_per_s"] > 0, name
        assert out[name]["ns_per_op"] > 0, name
        assert out[name]["ops"] > 0, name
    for name in FIGURES[1:]:
        assert out[name]["dict_lookups_per_op"] > 0, name
    assert json.loads(capsys.readouterr().out)["quick"] is True
