"""`python -m pipelines bench` on tiny models (CPU): several models, cached rows, the image difference of each row
against the same-seed 16-bit baseline, and a peer row that says what it needs."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

from pipelines.bench import SUITE, bench_models, bench_precisions
from pipelines.cli import build_parser, main


@pytest.fixture(scope="module")
def bench_json(tiny_flux, tiny_sdxl, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "a red circle", "--model", str(tiny_flux), str(tiny_sdxl), "--precision", "bf16", "fp8",
                     "--width", "32", "--height", "32", "--steps", "9", "--seed", "3", "--runs", "1", "--warmup", "1",
                     "--cache", "fast", "--peer", "torchao", "--device", "cpu", "--json-out", str(out)])
    assert code == 0
    return {**json.loads(out.read_text()), "printed": printed.getvalue()}


def test_every_model_gets_its_rows_and_a_baseline(bench_json, tiny_flux, tiny_sdxl):
    assert list(bench_json["models"]) == [str(tiny_flux), str(tiny_sdxl)]
    for model in bench_json["models"].values():
        labels = [r["label"] for r in model["rows"]]
        assert labels == ["prism bf16", "prism bf16 + cache fast", "prism fp8", "prism fp8 + cache fast",
                          "peer: torchao FP8 per-row + compile"]
        assert list(model["baselines"]) == ["bf16"]
        assert all(r["step_ms"] > 0 and r["total_ms"] > 0 for r in model["rows"][:4])


def test_each_row_shows_its_image_difference_from_16bit(bench_json):
    for model in bench_json["models"].values():
        plain, cached, fp8, fp8_cached, _ = model["rows"]
        # on a CPU no lever acts, so prism's bf16 is the eager baseline's image exactly (JSON writes inf as Infinity)
        assert plain["psnr_db"] == math.inf and plain["ssim"] == pytest.approx(1.0)
        assert 15 < cached["psnr_db"] < math.inf and cached["cache"] == "fast"
        assert 15 < fp8["psnr_db"] < math.inf and fp8_cached["psnr_db"] < math.inf


def test_the_report_says_which_levers_act_here(bench_json):
    assert ("PyTorch levers: torch.compile off (--no-compile), CUDA graphs off (--torch-cuda-graphs turns it on)"
            in bench_json["printed"])
    assert "| prism bf16 + cache fast |" in bench_json["printed"] and "identical / 1.000" in bench_json["printed"]


def test_the_torchao_peer_row_says_what_it_needs(bench_json):
    for model in bench_json["models"].values():
        peer = model["rows"][-1]
        assert "torchao" in peer["error"] and "\n" not in peer["error"] and peer["step_ms"] == 0


def test_suite_runs_the_four_hub_models_at_each_precision(cpu_manager):
    args = build_parser().parse_args(["bench", "--suite"])
    assert bench_models(args) == list(SUITE) == ["flux.1-dev", "flux.1-schnell", "sdxl-base-1.0", "sdxl-turbo"]
    assert bench_precisions(args, cpu_manager, "flux.1-dev") == ["bf16", "fp8", "fp4"]
    args = build_parser().parse_args(["bench", "--suite", "--precision", "fp8"])
    assert bench_precisions(args, cpu_manager, "sdxl-turbo") == ["fp8"]
    assert bench_precisions(build_parser().parse_args(["bench"]), cpu_manager, "x") == ["bf16"]


def test_an_unknown_model_or_peer_is_one_line(capsys):
    assert main(["bench", "--model", "demo-flux", "no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model" in err and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--peer", "tensorrt"])


def test_one_manager_at_a_time_runs_torch(tiny_flux, tiny_sdxl, monkeypatch):
    """On a CPU two live threads that have run torch ops halve the speed of both (libgomp stops spin-waiting), so
    the baseline's manager is closed before Prism's runs anything, and Prism's before the next model's baseline."""
    from pipelines.manager import PipelineManager

    ran, closed, overlaps = [], set(), []
    generate, close = PipelineManager.generate, PipelineManager.close

    def spy_generate(self, request):
        others = [m for m in ran if m is not self and id(m) not in closed]
        if others:
            overlaps.append(len(others))
        if self not in ran:
            ran.append(self)
        return generate(self, request)

    def spy_close(self):
        closed.add(id(self))
        return close(self)

    monkeypatch.setattr(PipelineManager, "generate", spy_generate)
    monkeypatch.setattr(PipelineManager, "close", spy_close)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "a red circle", "--model", str(tiny_flux), str(tiny_sdxl), "--precision", "fp8",
                     "--width", "32", "--height", "32", "--steps", "2", "--runs", "1", "--warmup", "1",
                     "--device", "cpu"])
    assert code == 0
    assert len(ran) == 4 and not overlaps, (len(ran), overlaps)  # a baseline and a Prism manager per model
    assert printed.getvalue().count("| baseline: diffusers eager ") == 2
