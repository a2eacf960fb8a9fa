"""The model makers' own ONNX exports as an alternative source (e.g. black-forest-labs/FLUX.1-dev-onnx).

Black Forest Labs publish the Flux transformer as ONNX in bf16, fp8 and fp4 (quantized by NVIDIA with
ModelOpt, the source the TensorRT demo's `--download-onnx-models` uses). They are gated like the
weights: the user's token is needed (HF_TOKEN or `hf auth login`). Downloaded on demand into the
Hugging Face cache, and built like our own exports; the engine key records the repository and folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ...loading import HubOptions, translate_hub_errors
from ...precision import Precision
from ...registry import ModelSpec

# model id -> ONNX repository; folder per precision inside it (layout of the published repos)
REPOS = {"flux.1-dev": "black-forest-labs/FLUX.1-dev-onnx", "flux.1-schnell": "black-forest-labs/FLUX.1-schnell-onnx"}
FOLDERS = {"transformer": {Precision.BF16: "transformer.opt/bf16", Precision.FP8: "transformer.opt/fp8",
                           Precision.FP4: "transformer.opt/fp4"}}
MODEL_FILE = "model.onnx"


def _folder(spec: ModelSpec, component: str, precision: Precision) -> tuple[str, str]:
    precision = Precision.parse(precision)
    if spec.id not in REPOS:
        raise ValueError(f"{spec.id} has no official ONNX export we know of ({', '.join(REPOS)} do); "
                         "use --onnx-source export.")
    folders = FOLDERS.get(component, {})
    if precision not in folders:
        offered = ", ".join(f"{c} at {', '.join(p.value for p in f)}" for c, f in FOLDERS.items())
        raise ValueError(f"The official ONNX export of {spec.id} offers {offered}; not {component} at {precision.value}. "
                         "Use --onnx-source export for the other components.")
    return REPOS[spec.id], folders[precision]


def recipe_label(spec: ModelSpec, precision: Precision) -> str:
    repo, folder = _folder(spec, spec.denoiser, precision)
    return f"official:{repo}/{folder}@{spec.revision or 'main'}"


def fetch(spec: ModelSpec, component: str, precision: Precision, hub: HubOptions,
          download: Callable[..., str] | None = None) -> Path:
    """The local path of the official `model.onnx` (its external data beside it), downloading it if needed."""
    repo, folder = _folder(spec, component, precision)
    if download is None:
        from huggingface_hub import snapshot_download as download
    with translate_hub_errors(spec, hub):
        root = download(repo_id=repo, allow_patterns=[f"{folder}/*"], revision=spec.revision, token=hub.token,
                        cache_dir=hub.cache_dir, local_files_only=hub.is_offline)
    path = Path(root) / folder / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{repo} has no {folder}/{MODEL_FILE}; the repository layout may have changed.")
    return path
