#!/usr/bin/env python3
"""Full-size ONNX export of Flux.1-dev (or SDXL) with random weights, FP8 / NVFP4 calibrated with ModelOpt, checked.

For the lent H100 machine (python3.12, torch 2.11, no TensorRT): it runs the TensorRT backend's own
artifact chain (pipelines/backends/tensorrt/artifacts.py) up to the checked ONNX, and measures it:
calibration and export times, ONNX size (graph + data), peak GPU memory, peak host memory, onnx's
checker and shape inference (times and outcome), and how many layers are FP8 / FP4.

Times on an H200 (2026-11-26): SDXL's UNet about 2 minutes per precision; the full FLUX.1-dev
transformer 9.5 minutes at FP8 and 6.5 at NVFP4, mostly torch.export + ONNX translation (see BENCHMARKS.md):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    python3 scripts/gpu_trt_export.py --model sdxl-base-1.0 --only fp8,fp4
    python3 scripts/gpu_trt_export.py --only fp8 --layers 2:4      # quick smoke run: 2 + 4 blocks, full width

Wheels to carry (not on that machine): diffusers==0.42.1 importlib_metadata zipp nvidia-modelopt==0.47.0
onnxscript==0.7.2 onnx_ir==1.1.0 omegaconf pydantic==2.14.4 pydantic-core==2.50.5 annotated-types
typing-inspection typing_extensions rich markdown-it-py mdurl pygments (about 14 MB; scipy is there). `pulp` is
stubbed below when missing: ModelOpt imports it for its auto-quantize search only, never run here.

The full-depth Flux run (both precisions, ~16 minutes) outlasts one 10-minute device call: start it
detached and collect it with a second call while the machine is still warm (this is how the
BENCHMARKS.md rows were made):

    mkdir -p /tmp/trt-out                                                   # call 1, then sleep in that call:
    OUT=/tmp/trt-out setsid nohup python3 scripts/gpu_trt_export.py --only fp8,fp4 > /tmp/trt.log 2>&1 < /dev/null &
    while pgrep -f 'python3 scripts/gpu_trt_expor[t]' >/dev/null; do sleep 10; done; cp /tmp/trt-out/* $OUT/   # call 2

(the bracket keeps pgrep from matching the shell running the loop, whose command line names the script).

Results go to $OUT when set (log, results.json, benchmarks.md with rows for BENCHMARKS.md); the ONNX
files stay on the machine's disk (--cache) and are deleted after measuring unless --keep.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
NEEDED = ("torch", "diffusers", "transformers", "onnx", "onnxscript", "onnx_ir", "modelopt", "scipy", "pydantic",
          "omegaconf", "rich", "importlib_metadata")


class Tee:
    """Everything printed also goes to $OUT/gpu_trt_export.log, flushed per line (a killed run keeps its log)."""

    def __init__(self, stream, path: Path):
        self.stream, self.file = stream, open(path, "a", buffering=1)

    def write(self, text):
        self.stream.write(text)
        self.file.write(text)
        self.stream.flush()

    def flush(self):
        self.stream.flush()
        self.file.flush()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _placeholder_class(name: str) -> type:
    if name.startswith("_"):  # inspect and importlib probe __file__, __path__ ...: those must stay missing
        raise AttributeError(name)
    return type(name, (), {})


def check_imports() -> None:
    import importlib.util

    if importlib.util.find_spec("pulp") is None:  # see the module docstring
        stub = types.ModuleType("pulp")
        # ModelOpt 0.47 names pulp classes in annotations evaluated at import (pulp.LpVariable): any
        # attribute is a placeholder class, which is all an import needs.
        stub.__getattr__ = _placeholder_class
        sys.modules["pulp"] = stub
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"missing Python packages: {', '.join(missing)} -- carry their wheels (see this script's docstring)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="flux.1-dev", help="flux.1-dev, flux.1-schnell, sdxl-base-1.0 ...")
    p.add_argument("--only", default="fp8", help="comma-separated: bf16, fp16, fp8, fp4 (default fp8)")
    p.add_argument("--components", default=None, help="comma-separated (default: the denoiser only)")
    p.add_argument("--calib-prompts", type=int, default=8)
    p.add_argument("--calib-steps", type=int, default=8)
    p.add_argument("--calib-size", type=int, default=1024, help="calibration image side in pixels")
    p.add_argument("--layers", default=None, help="N:M: keep N double and M single Flux blocks (smoke runs)")
    p.add_argument("--cache", default="/tmp/prism-gpu-cache", help="engine cache folder for the ONNX artifacts")
    p.add_argument("--keep", action="store_true", help="keep the ONNX files (default: delete after measuring)")
    p.add_argument("--no-shape-inference", action="store_true")
    return p.parse_args()


def truncated(spec, layers: str | None):
    """The spec with fewer Flux blocks (full width), under its own id so no artifact is mistaken for the full model."""
    if not layers:
        return spec
    from pipelines.registry import ComponentSpec

    double, single = (int(v) for v in layers.split(":"))
    comp = spec.components["transformer"]
    config = {**comp.config, "num_layers": double, "num_single_layers": single}
    components = {**spec.components, "transformer": ComponentSpec(comp.library, comp.class_name, config)}
    return replace(spec, id=f"{spec.id}-{double}x{single}", components=components)


def inspect_onnx(path: Path, shape_inference: bool) -> dict:
    import onnx

    from pipelines.backends.tensorrt import export

    out: dict = {}
    model = onnx.load(str(path), load_external_data=False)
    out["proto_bytes"] = path.stat().st_size
    out["data_bytes"] = Path(str(path) + export.DATA_SUFFIX).stat().st_size
    types_ = onnx.TensorProto
    out["fp8_weights"] = sum(t.name.endswith(".weight_fp8") for t in model.graph.initializer)
    out["fp4_weights"] = sum(t.name.endswith(".weight_fp4") for t in model.graph.initializer)
    out["fp4_dynamic_quantizers"] = sum(n.op_type == "TRT_FP4DynamicQuantize" for n in model.graph.node)
    out["quantize_linear"] = sum(n.op_type == "QuantizeLinear" for n in model.graph.node)
    out["nodes"] = len(model.graph.node)
    out["opsets"] = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    out["initializer_types"] = sorted({types_.DataType.Name(t.data_type) for t in model.graph.initializer})
    del model
    started = time.monotonic()
    onnx.checker.check_model(str(path))
    out["checker_s"] = round(time.monotonic() - started, 1)
    out["checker"] = "passed"
    if shape_inference:
        inferred = path.with_name(path.name + ".inferred")
        started = time.monotonic()
        try:
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
            model = onnx.load(str(inferred), load_external_data=False)
            out["shape_inference"] = f"passed ({len(model.graph.value_info)} tensors typed)"
            del model
        except Exception as exc:  # report, don't stop: the sizes and times are still worth having
            out["shape_inference"] = f"FAILED: {type(exc).__name__}: {str(exc)[:300]}"
        finally:
            inferred.unlink(missing_ok=True)
        out["shape_inference_s"] = round(time.monotonic() - started, 1)
    return out


def run_one(spec, component: str, precision, args, cache, device: str = "cuda") -> dict:
    import torch

    from pipelines.backends.tensorrt.artifacts import ArtifactBuilder, EngineRequest
    from pipelines.backends.tensorrt.export import DATA_SUFFIX, ShapeRanges
    from pipelines.backends.tensorrt.quantize import QuantRecipe
    from pipelines.engine_cache import Manifest
    from pipelines.loading import WeightSource

    capability = tuple(torch.cuda.get_device_capability())
    recipe = None
    if not precision.is_16bit:
        recipe = QuantRecipe(precision, prompts=args.calib_prompts, steps=args.calib_steps,
                             width=args.calib_size, height=args.calib_size)
    req = EngineRequest(spec, component, precision, ShapeRanges.for_spec(spec), capability,
                        WeightSource(random_weights=True), recipe=recipe)
    builder = ArtifactBuilder(cache, device=device, report=lambda done, total, message: log(f"  {message}"))
    torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    path = builder.onnx(req)
    total_s = time.monotonic() - started
    result = {"model": spec.id, "component": component, "precision": precision.value, "dtype": str(req.dtype),
              "onnx": str(path), "total_s": round(total_s, 1),
              "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "host_peak_gib": round(host_peak_gib(), 2)}
    onnx_manifest = Manifest.from_json(cache.manifest_path(builder.onnx_key(req)).read_text())
    result["onnx_step_s"] = onnx_manifest.build_seconds
    if req.quantized:
        path_cal, calibration = builder.calibration(req)
        cal_manifest = Manifest.from_json(cache.manifest_path(builder.calibration_key(req)).read_text())
        result.update(calibration_s=cal_manifest.build_seconds, recipe=calibration["recipe"],
                      calibrated_layers=len(calibration["amax"]), left_16bit=len(calibration["left_16bit"]),
                      non_finite_images=len(calibration.get("non_finite_images", [])))
        result["export_s"] = round(onnx_manifest.build_seconds - cal_manifest.build_seconds, 1)
    else:
        result["export_s"] = onnx_manifest.build_seconds
    log(f"  checking {path.name}")
    result.update(inspect_onnx(path, not args.no_shape_inference))
    result["onnx_gib"] = round((result["proto_bytes"] + result["data_bytes"]) / 2**30, 3)
    if not args.keep:
        Path(str(path) + DATA_SUFFIX).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    return result


def markdown(results: list[dict], gpu: str) -> str:
    rows = ["| model | component | precision | calibration | export (incl. lowering, save, checker) | ONNX size | "
            "FP8 / FP4 layers | peak GPU | peak host | checker | shape inference |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['component']} | {r['precision']} | failed: {r['error'][:120]} |||||||||")
            continue
        cal = f"{r['calibration_s']:.0f} s ({r['recipe']})" if "calibration_s" in r else "-"
        rows.append(f"| {r['model']} | {r['component']} | {r['precision']} ({r['dtype'].removeprefix('torch.')}) | {cal} | "
                    f"{r['export_s']:.0f} s | {r['onnx_gib']:.2f} GiB | {r['fp8_weights']} / {r['fp4_weights']} | "
                    f"{r['gpu_peak_gib']:.1f} GiB | {r['host_peak_gib']:.1f} GiB | {r['checker']} ({r['checker_s']} s) | "
                    f"{r.get('shape_inference', 'skipped')} |")
    return f"{gpu}, {time.strftime('%Y-%m-%d')}, random weights, `{' '.join(sys.argv)}`\n\n" + "\n".join(rows) + "\n"


def main() -> int:
    args = parse_args()
    if OUT:
        OUT.mkdir(parents=True, exist_ok=True)
        sys.stdout = Tee(sys.stdout, OUT / "gpu_trt_export.log")
        sys.stderr = Tee(sys.stderr, OUT / "gpu_trt_export.log")
    check_imports()
    import torch

    if not torch.cuda.is_available():
        sys.exit("this script needs a CUDA GPU")
    import diffusers
    import modelopt
    import onnx
    import onnxscript
    import transformers

    from pipelines.engine_cache import EngineCache
    from pipelines.precision import Precision
    from pipelines.registry import resolve_spec

    gpu = f"{torch.cuda.get_device_name()} (sm{''.join(map(str, torch.cuda.get_device_capability()))})"
    log(f"{gpu}; python {sys.version.split()[0]}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, modelopt {modelopt.__version__}, onnx {onnx.__version__}, "
        f"onnxscript {onnxscript.__version__}")
    cache_root = Path(args.cache)
    cache_root.mkdir(parents=True, exist_ok=True)
    log(f"disk free in {cache_root}: {shutil.disk_usage(cache_root).free / 2**30:.0f} GiB")
    cache = EngineCache(cache_root)
    spec = truncated(resolve_spec(args.model), args.layers)
    components = args.components.split(",") if args.components else [spec.denoiser]
    results = []
    for precision in (Precision.parse(p) for p in args.only.split(",")):
        for component in components:
            log(f"{spec.id} {component} {precision.value}")
            try:
                result = run_one(spec, component, precision, args, cache)
            except Exception as exc:  # keep going: one failure should not hide the other measurements
                import traceback

                traceback.print_exc()
                result = {"model": spec.id, "component": component, "precision": precision.value,
                          "error": f"{type(exc).__name__}: {exc}"}
            log(json.dumps(result, indent=1))
            results.append(result)
            gc.collect()
            torch.cuda.empty_cache()
    table = markdown(results, gpu)
    print(table)
    if OUT:
        (OUT / "results.json").write_text(json.dumps(results, indent=1))
        (OUT / "benchmarks.md").write_text(table)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
