"""The denoising loops' progress reports: each step is reported once the device has finished it; by default the
host queues one step ahead of the step it reports (--no-run-ahead waits for every step before the next)."""
import time
from dataclasses import replace

import pytest
import torch

from pipelines.cli import build_parser
from pipelines.config import manager_config
from pipelines.manager import ManagerConfig, PipelineManager
from pipelines.request import GenerationRequest
from pipelines.run_context import JobCancelled, Progress, RunContext, StepReports

from conftest import fast_16bit_cpu


class RecordingClock:
    """A Stopwatch stand-in whose marks are numbers and which records what it was asked to wait for."""

    def __init__(self, events: list):
        self.events, self.count = events, 0

    def mark(self) -> int:
        self.count += 1
        return self.count

    def wait(self, mark: int) -> None:
        self.events.append(("wait", mark))


def _run_steps(steps: int, ahead: int, progress=(0, None)) -> list:
    events: list = []
    ctx = RunContext(torch.device("cpu"), on_progress=lambda p: events.append(("report", p.done, p.total)),
                     steps_ahead=ahead)
    clock = RecordingClock(events)
    marks = [clock.mark()]  # mark 1: where the steps start; step k ends at mark k + 1
    reports = StepReports(ctx, clock, marks, (progress[0], progress[1] or steps))
    for k in range(1, steps + 1):
        events.append(("queued", k))
        reports.step_done()
    reports.all_done()
    return events


def test_without_run_ahead_each_step_is_waited_for_before_the_next_is_queued():
    assert _run_steps(3, ahead=0) == [("queued", 1), ("wait", 2), ("report", 1, 3),
                                      ("queued", 2), ("wait", 3), ("report", 2, 3),
                                      ("queued", 3), ("wait", 4), ("report", 3, 3)]


def test_running_ahead_queues_the_next_step_before_waiting_for_the_one_it_reports():
    assert _run_steps(3, ahead=1) == [("queued", 1),
                                      ("queued", 2), ("wait", 2), ("report", 1, 3),
                                      ("queued", 3), ("wait", 3), ("report", 2, 3),
                                      ("wait", 4), ("report", 3, 3)]


@pytest.mark.parametrize("ahead", [0, 1])
def test_a_single_step_and_a_later_stage_are_reported_against_the_job_total(ahead):
    assert _run_steps(1, ahead)[-2:] == [("wait", 2), ("report", 1, 1)]
    # the refiner's steps follow the base's: 7 done before, 10 in all
    reported = [e[1:] for e in _run_steps(3, ahead, progress=(7, 10)) if e[0] == "report"]
    assert reported == [(8, 10), (9, 10), (10, 10)]


def test_two_steps_ahead_still_reports_every_step_once_in_order():
    assert _run_steps(3, ahead=2) == [("queued", 1), ("queued", 2),
                                      ("queued", 3), ("wait", 2), ("report", 1, 3),
                                      ("wait", 3), ("report", 2, 3), ("wait", 4), ("report", 3, 3)]


def test_no_steps_report_nothing():
    assert _run_steps(0, ahead=1) == []


def test_the_flag_turns_it_off_in_the_cli_and_the_app():
    from ui.launch import options_from_args

    parse = build_parser().parse_args
    assert manager_config(parse(["generate", "a fox"])).steps_ahead == 1
    assert manager_config(parse(["generate", "a fox", "--no-run-ahead"])).steps_ahead == 0
    assert options_from_args(["--no-run-ahead"]).manager.steps_ahead == 0
    assert options_from_args([]).manager.steps_ahead == 1


def test_a_value_given_to_the_flag_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["generate", "a fox", "--no-run-ahead=1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--no-run-ahead" in err and "Traceback" not in err


def test_the_app_refuses_a_value_given_to_the_flag_in_one_line_too(capsys):
    from ui.launch import options_from_args

    with pytest.raises(SystemExit) as exit_:
        options_from_args(["--no-run-ahead=yes"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--no-run-ahead" in err and "ignored explicit argument" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["flux", "sdxl with refiner"])
def test_every_step_of_a_job_is_reported_once_in_order_and_the_image_is_the_same(family, tiny_flux, tiny_sdxl_pair,
                                                                                 monkeypatch):
    import pipelines.families.flux as flux_family
    import pipelines.families.sdxl as sdxl_family

    made = []  # the steps_ahead each denoising loop ran with

    class Recorded(StepReports):
        def __init__(self, ctx, *args):
            super().__init__(ctx, *args)
            made.append(self.ahead)

    for module in (flux_family, sdxl_family):
        monkeypatch.setattr(module, "StepReports", Recorded)
    model = str(tiny_flux) if family == "flux" else str(tiny_sdxl_pair[0])
    request = GenerationRequest("a red kite", model, steps=6, width=32, height=32, seed=4,
                                refiner=0.5 if family != "flux" else None)
    results = {}
    for ahead in (0, 1):
        seen: list[Progress] = []
        manager = PipelineManager(ManagerConfig(device="cpu", steps_ahead=ahead), device_info=fast_16bit_cpu())
        try:
            results[ahead] = manager.generate(request, on_progress=seen.append)
        finally:
            manager.close()
        assert made and set(made) == {ahead}  # the manager's setting reached the loops (base and refiner)
        made.clear()
        steps = [(p.done, p.total) for p in seen if p.stage == "denoise"]
        total = len(results[ahead].timings.steps_ms)
        assert steps == [(k, total) for k in range(1, total + 1)]
        if family != "flux":
            assert results[ahead].timings.refiner_steps > 0
    assert results[0].images[0].tobytes() == results[1].images[0].tobytes()
    assert len(results[0].timings.steps_ms) == len(results[1].timings.steps_ms)


def test_a_cancelled_job_stops_within_a_step_of_the_report(tiny_flux):
    """Running ahead, the step queued after the reported one may run; the job still stops long before the end,
    and the manager serves the next job."""
    manager = PipelineManager(ManagerConfig(device="cpu"), device_info=fast_16bit_cpu())
    try:
        request = GenerationRequest("a red kite", str(tiny_flux), steps=20, width=32, height=32, seed=1)
        jobs, seen = [], []

        def cancel_at_first_step(p: Progress):
            seen.append(p)
            if p.stage == "denoise" and p.done == 1:
                while not jobs:  # submit() has not returned yet
                    time.sleep(0.01)
                jobs[0].cancel()

        jobs.append(manager.submit(request, on_progress=cancel_at_first_step))
        with pytest.raises(JobCancelled):
            jobs[0].result(120)
        assert max(p.done for p in seen if p.stage == "denoise") == 1
        assert len(manager.generate(replace(request, steps=2)).timings.steps_ms) == 2
    finally:
        manager.close()
