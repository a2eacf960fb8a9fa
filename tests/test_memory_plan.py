"""The memory planner as arithmetic (no models, no manager), and the one path from flags to a ManagerConfig."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipelines import memory_plan
from pipelines.config import FlagError, add_runtime_args, manager_config
from pipelines.precision import Precision
from pipelines.registry import resolve_spec

STAGES = (("tokenizer", "text_encoder"), ("scheduler", "unet"), ("vae",))
WEIGHTS = {"tokenizer": 0, "text_encoder": 100, "scheduler": 0, "unet": 500, "vae": 50}


def test_a_stage_needs_its_weights_plus_working_memory_or_a_loads_peak():
    peaks = {"text_encoder": 100, "unet": 500, "vae": 50}
    needs = memory_plan.stage_needs(STAGES, WEIGHTS, peaks, working=30)
    assert needs == [(STAGES[0], 130), (STAGES[1], 530), (STAGES[2], 80)]
    # Quantizing the UNet from 16-bit weights peaks at 900 while loading: that is the stage's need.
    needs = memory_plan.stage_needs(STAGES, WEIGHTS, {**peaks, "unet": 900}, working=30)
    assert needs[1] == (STAGES[1], 900)


def test_refusal_gives_the_numbers_only_when_the_largest_stage_does_not_fit():
    spec = resolve_spec("sdxl-base-1.0")
    needs = [(STAGES[0], 130), (STAGES[1], 2_000_000_000)]
    assert memory_plan.refusal(spec, Precision.FP16, needs, 30, budget=2_000_000_000, used=0) is None
    message = memory_plan.refusal(spec, Precision.FP16, needs, 30, budget=1_500_000_000, used=1_000_000_000)
    assert message.startswith("sdxl-base-1.0 at fp16 needs 2.0 GB at once (unet and 30 B of working memory)")
    assert "budget is 1.5 GB and 500.0 MB of it is free now" in message


def test_the_hint_names_the_first_smaller_precision_that_fits_and_asks_no_further():
    asked = []

    def need_of(precision):
        asked.append(precision)
        return {Precision.FP8: None, Precision.FP4: 400}[precision]  # FP8 cannot run here

    hint = memory_plan.smaller_precision_hint(Precision.BF16, 500, need_of)
    assert hint.startswith("fp4 would fit (needs 400 B)") and asked == [Precision.FP8, Precision.FP4]
    asked.clear()
    assert memory_plan.smaller_precision_hint(Precision.FP16, 500, lambda p: 450).startswith("fp8 would fit")
    assert "No smaller precision fits" in memory_plan.smaller_precision_hint(Precision.FP8, 300, need_of)
    assert "No smaller precision fits" in memory_plan.smaller_precision_hint(Precision.FP4, 10**12, need_of)


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_runtime_args(parser)
    return parser.parse_args(list(argv))


def test_runtime_flags_become_one_manager_config(tmp_path):
    config = manager_config(_flags("--device", "cpu", "--compile", "--no-cuda-graphs", "--weight-streaming-budget",
                                   "8GB", "--engine-cache", str(tmp_path), "--offline"), max_queue=2)
    assert (config.device, config.max_queue, config.engine_cache_dir) == ("cpu", 2, Path(tmp_path))
    assert config.torch.compile and config.hub.offline
    assert not config.tensorrt.cuda_graphs and config.tensorrt.weight_streaming_budget == 8 * 10**9
    defaults = manager_config(_flags())
    assert defaults.tensorrt.cuda_graphs and defaults.tensorrt.weight_streaming_budget is None
    assert not defaults.torch.compile


@pytest.mark.parametrize("value", ["lots", "0.5", "0GB"])
def test_a_bad_weight_streaming_budget_says_what_to_write(value, capsys):
    with pytest.raises(FlagError, match="--weight-streaming-budget .* is not a size; write e.g. 8GB"):
        manager_config(_flags("--weight-streaming-budget", value))
    from pipelines.cli import main

    assert main(["generate", "x", "--device", "cpu", "--weight-streaming-budget", value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --weight-streaming-budget") and "Traceback" not in err


def test_the_app_refuses_a_bad_weight_streaming_budget_at_once():
    from ui.launch import LaunchError, options_from_args

    with pytest.raises(LaunchError, match="--weight-streaming-budget 'lots' is not a size"):
        options_from_args(["--weight-streaming-budget", "lots"])
    assert options_from_args(["--no-cuda-graphs"]).manager.tensorrt.cuda_graphs is False


def test_each_device_names_the_memory_it_reports():
    from pipelines.gpu import GiB, DeviceInfo

    def kind(device: str, unified: bool) -> str:
        return DeviceInfo(device, "X", None if device == "cpu" else (12, 1), 8 * GiB, 4 * GiB, unified).describe()

    # A CPU is "unified" for residency (parking weights in RAM frees nothing), but its memory is plain RAM.
    assert kind("cpu", True).endswith("4.0 of 8.0 GiB free (system RAM)")
    assert kind("cuda:0", True).endswith("(unified memory shared with the CPU)")  # a DGX Spark
    assert kind("cuda:0", False).endswith("(GPU memory)")
