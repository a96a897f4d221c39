"""bench/plan_quality.py: the check costs it takes from a bench run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _plan_quality():
    spec = importlib.util.spec_from_file_location(
        "plan_quality", ROOT / "bench" / "plan_quality.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_check_costs_come_from_the_bench_cells_of_the_runs_model_and_dtype(tmp_path):
    pq = _plan_quality()
    cell = {"model": "m", "dtype": "bfloat16", "task": "sst2", "shots": 5}
    rows = [
        {**cell, "batch_size": 1, "check_cost_layers": 1.2},
        {**cell, "batch_size": 8, "check_cost_layers": 0.2},
        {**cell, "dtype": "float32", "batch_size": 1, "check_cost_layers": 9.0},
        {**cell, "task": "capitalize", "batch_size": 1, "check_cost_layers": 7.0},
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"rows": rows}))
    run = {"model": "m", "dtype": "bfloat16"}
    assert pq.bench_check_costs(path, run, "sst2", 5) == {1: 1.2, 8: 0.2}
    with pytest.raises(SystemExit, match="no m bfloat16 sst2 0-shot cell"):
        pq.bench_check_costs(path, run, "sst2", 0)
