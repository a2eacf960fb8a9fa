"""`python -m pipelines bench`: the same-run baseline is the eager module, whatever the compile default."""
from __future__ import annotations

import json

from pipelines import bench, cli


def test_bench_baseline_is_eager_and_rows_are_written(tmp_path, monkeypatch):
    configs = []
    real = bench.PipelineManager

    def recording(config):
        configs.append(config)
        return real(config)

    monkeypatch.setattr(bench, "PipelineManager", recording)
    out = tmp_path / "bench.json"
    # The baseline must say compile=False: the auto default (None) compiles on CUDA GPUs, which once turned
    # the "eager" baseline into a compiled one.
    rc = cli.main(["bench", "--model", "demo-flux", "--precision", "bf16", "--steps", "2", "--runs", "1",
                   "--warmup", "1", "--seed", "1", "--device", "cpu", "--json-out", str(out)])
    assert rc in (0, None)
    measured, baseline = configs
    assert baseline.torch.compile is False and baseline.backend == "torch"
    rows = json.loads(out.read_text())
    assert set(rows["baselines"]) == {"bf16"} and rows["baselines"]["bf16"]["backend"].endswith("(eager)")
    assert [r["precision"] for r in rows["rows"]] == ["bf16"] and rows["rows"][0]["steps"] == 2
