# Prism on a DGX Spark (aarch64, GB10) or any NVIDIA GPU machine.
# NVIDIA's PyTorch container brings CUDA, torch and full TensorRT for its architecture; we add only
# Prism's own dependencies and never replace its torch.
#
#   docker build -t prism .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -p 7860:7860 \
#     -v $HOME/.cache/huggingface:/root/.cache/huggingface -v prism-engines:/app/engine_cache \
#     -e HF_TOKEN prism
FROM nvcr.io/nvidia/pytorch:25.11-py3

WORKDIR /app
COPY requirements.txt ./
# modelopt calibrates FP8/FP4 engines; onnxruntime checks exported graphs. Both are optional at run time.
RUN pip install --no-cache-dir -r requirements.txt "nvidia-modelopt[torch]" onnxruntime onnxscript

COPY . .
ENV PRISM_ENGINE_CACHE=/app/engine_cache \
    GRADIO_ANALYTICS_ENABLED=False
EXPOSE 7860
# 0.0.0.0 inside the container; publish the port only where you mean to (add --auth for a shared LAN).
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
