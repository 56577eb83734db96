"""`run_benchmarks.py --only X --update-readme`: the README table keeps the newest figure of every row."""

import importlib
import json
import sys
from pathlib import Path


def _bench():
    here = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if here not in sys.path:
        sys.path.insert(0, here)
    return importlib.import_module("run_benchmarks")


def _write(folder: Path, stamp: str, results: dict, quick=False, only=None) -> None:
    name = f"{stamp}-cpu{'-quick' if quick else ''}.json"
    (folder / name).write_text(json.dumps({"date": stamp, "quick": quick, "only": only, "results": results}))


def test_an_only_run_takes_each_other_row_from_the_newest_run_that_measured_it(tmp_path):
    B = _bench()
    _write(tmp_path, "20261204T050000Z", {"scale": {"ratio": 1.20}, "study_overhead": {"ratio": 1.30},
                                          "slicer_gil": {"ratio": 0.80}})
    _write(tmp_path, "20261204T060000Z", {"study_overhead": {"ratio": 1.05}}, only=["study"])  # newer, --only
    _write(tmp_path, "20261204T063000Z", {"scale": {"ratio": 9.99}}, quick=True)  # a smoke run: never used
    _write(tmp_path, "20261204T064000Z", {"slicer_gil": {"error": "TimeoutError"}}, only=["slicer_gil"])  # failed
    record = {"date": "20261204T070000Z", "results": {"methods": {"ratio": 1.4}}}
    merged = B._merged_with_earlier_runs(record, tmp_path, "cpu")["results"]
    assert merged["study_overhead"]["ratio"] == 1.05  # not the older full run's 1.30
    assert merged["scale"]["ratio"] == 1.20  # not the quick run's
    assert merged["slicer_gil"]["ratio"] == 0.80  # a failed row does not replace a measured one
    assert merged["methods"]["ratio"] == 1.4
    also = B._merged_with_earlier_runs(record, tmp_path, "cpu")["also_from"]
    assert also == "20261204T050000Z-cpu.json, 20261204T060000Z-cpu.json"
