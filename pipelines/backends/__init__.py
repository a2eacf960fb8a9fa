"""Execution backends for heavy components (PyTorch, TensorRT)."""
