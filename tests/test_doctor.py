"""`python -m pipelines doctor` on a CPU: real checks through the manager, pass/fail logic, budget, report."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import doctor
from pipelines.doctor import FAILED, NOT_APPLICABLE, NOT_RUN, VERIFIED, DoctorReport, run_doctor
from pipelines.cpu_math import measure_cpu_math

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory) -> DoctorReport:
    return run_doctor("cpu", budget_seconds=600, cache_dir=tmp_path_factory.mktemp("doctor-cache"))


def _row(report: DoctorReport, backend: str, precision: str):
    return next(c for c in report.checks if c.backend == backend and c.precision == precision)


def test_cpu_doctor_verifies_every_torch_precision_against_16_bit(cpu_report):
    ref = _row(cpu_report, "torch", "bf16")
    assert ref.status == VERIFIED and "reference" in ref.detail
    for precision in ("fp16", "fp8", "fp4"):
        row = _row(cpu_report, "torch", precision)
        assert row.status == VERIFIED, row
        assert 0 < row.rel_error <= doctor.MAX_REL_ERROR[doctor.Precision(precision)]
    # FP4 weights move the image more than FP8 does (measured 0.046 vs 0.007 on demo-flux).
    assert _row(cpu_report, "torch", "fp4").rel_error > _row(cpu_report, "torch", "fp8").rel_error
    # What the fp4 row ran as follows this CPU's measured 16-bit speed (pipelines/cpu_math.py).
    compute = "16-bit" if measure_cpu_math().fast_bf16 else "FP32"
    assert f"FP4 weights, {compute} compute" in _row(cpu_report, "torch", "fp4").detail
    assert cpu_report.ok


def test_cpu_doctor_says_what_tensorrt_can_and_cannot_do_here(cpu_report):
    build = _row(cpu_report, "tensorrt", "fp16")
    assert build.status == VERIFIED
    assert "sm121" in build.detail and "not executed" in build.detail
    for precision in ("bf16", "fp8", "fp4"):
        row = _row(cpu_report, "tensorrt", precision)
        assert row.status == NOT_APPLICABLE and "GPU" in row.detail
    assert not any(c.backend == "torch+compile" for c in cpu_report.checks)  # compile is a GPU check


def test_report_names_the_machine_and_round_trips_as_json(cpu_report):
    for fact in ("CPU", "torch", "TensorRT", "nvidia-modelopt", "torchao", "NVIDIA driver"):
        assert cpu_report.facts[fact]
    data = json.loads(cpu_report.to_json())
    assert data["ok"] is True
    assert len(data["checks"]) == len(cpu_report.checks)
    table = cpu_report.table()
    assert "verified" in table and "not applicable" in table


def test_an_image_too_far_from_16_bit_fails_its_row(monkeypatch, tmp_path):
    monkeypatch.setitem(doctor.MAX_REL_ERROR, doctor.Precision.FP8, 1e-9)
    monkeypatch.setattr(doctor, "_plan", lambda capability: [(doctor.Backend.TORCH, doctor.Precision.FP8, False)])
    report = run_doctor("cpu", cache_dir=tmp_path)
    row = _row(report, "torch", "fp8")
    assert row.status == FAILED and "above the" in row.detail
    assert not report.ok


def test_rows_past_the_budget_are_not_run_and_the_cli_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pipelines", "doctor", "--device", "cpu", "--budget", "0",
                           "--json-out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    statuses = {(c["backend"], c["precision"]): c["status"] for c in data["checks"]}
    assert statuses[("torch", "bf16")] == VERIFIED  # the reference always runs
    assert statuses[("torch", "fp8")] == NOT_RUN
    assert statuses[("tensorrt", "fp4")] == NOT_APPLICABLE  # not applicable is known without running
    assert "Report written to" in proc.stdout and "the log" not in proc.stdout
