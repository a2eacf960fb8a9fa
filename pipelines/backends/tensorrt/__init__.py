"""TensorRT backend: ONNX export, ModelOpt FP8/NVFP4 calibration, engine build and runtime (see README.md)."""
