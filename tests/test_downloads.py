"""Hub downloads inside a job: byte progress reaches the job, Stop aborts between chunks, and only the files
`from_pretrained` reads are fetched. No network: huggingface_hub's snapshot_download is replaced by a fake that
drives the progress class the way the real one does."""
from __future__ import annotations

import threading

import huggingface_hub
import pytest
from huggingface_hub.utils import filter_repo_objects

from pipelines import manager as manager_module
from pipelines.downloads import component_patterns
from pipelines.loading import HubOptions
from pipelines.manager import JobState, ManagerConfig, PipelineManager
from pipelines.request import GenerationRequest
from pipelines.run_context import JobCancelled


def test_patterns_fetch_configs_tokenizer_files_and_default_weights_only():
    files = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
             "unet/diffusion_pytorch_model.bin", "unet/diffusion_pytorch_model.onnx", "unet/openvino_model.xml",
             "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model.safetensors.index.json",
             "text_encoder_2/model.fp16-00001-of-00002.safetensors", "tokenizer_2/spiece.model",
             "tokenizer/merges.txt", "tokenizer/vocab.json", "vae/diffusion_pytorch_model.safetensors", "model_index.json"]

    def picked(name):
        allow, ignore = component_patterns(name)
        return sorted(filter_repo_objects(files, allow_patterns=allow, ignore_patterns=ignore))

    assert picked("unet") == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert picked("text_encoder_2") == ["text_encoder_2/model-00001-of-00002.safetensors",
                                        "text_encoder_2/model.safetensors.index.json"]
    assert picked("tokenizer_2") == ["tokenizer_2/spiece.model"]
    assert picked("tokenizer") == ["tokenizer/merges.txt", "tokenizer/vocab.json"]


def test_a_download_reports_bytes_stop_aborts_it_and_the_next_job_runs(monkeypatch):
    calls, chunk_after_stop = [], threading.Event()

    def fake_snapshot_download(repo_id, *, tqdm_class, allow_patterns, ignore_patterns, **kwargs):
        calls.append((repo_id, allow_patterns, ignore_patterns))
        files = tqdm_class(total=3, desc="Fetching 3 files")  # the files bar comes first, as in the real one
        files.update(0)
        bytes_bar = tqdm_class(total=0, initial=0, unit="B", unit_scale=True)
        bytes_bar.total = 4_000_000_000  # announced as each file's size becomes known
        for _ in range(400):  # far more chunks than the test waits for
            stopped = job_holder["job"].cancel_event.is_set()
            bytes_bar.update(50_000_000)
            if stopped:  # a chunk taken although Stop came before it
                chunk_after_stop.set()
            threading.Event().wait(0.01)
        raise AssertionError("the download was not stopped")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(manager_module, "check_access", lambda spec, source: None)  # no network here
    seen, job_holder = [], {}

    def on_progress(p):
        if p.stage == "download":
            seen.append(p)
            if p.done >= 1_000_000_000:
                job_holder["job"].cancel()

    m = PipelineManager(ManagerConfig(device="cpu", memory_budget="1000GB", hub=HubOptions(offline=False)))
    try:
        job_holder["job"] = job = m.submit(GenerationRequest(prompt="a fox", model="flux.1-dev", steps=1, seed=1),
                                           on_progress=on_progress)
        with pytest.raises(JobCancelled):
            job.result(120)
        assert job.state is JobState.CANCELLED
        assert chunk_after_stop.is_set() is False  # the first chunk after Stop raised
        repo, allow, ignore = calls[0]
        assert repo == "black-forest-labs/FLUX.1-dev" and all(p.startswith("tokenizer/") for p in allow + ignore)
        bytes_seen = [p for p in seen if p.total == 4_000_000_000]
        assert bytes_seen and "downloading flux.1-dev tokenizer:" in bytes_seen[-1].message
        assert bytes_seen[-1].message.endswith("of 4.0 GB") and bytes_seen[-1].done < 4_000_000_000
        done = m.generate(GenerationRequest(prompt="a red circle", model="demo-flux", steps=1, seed=1), timeout=120)
        assert done.images
    finally:
        m.close()
