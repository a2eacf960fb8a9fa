# Prism on a DGX Spark (aarch64, GB10) or any NVIDIA GPU machine, fit for a shared LAN.
# NVIDIA's PyTorch container brings CUDA, torch and full TensorRT for its architecture. scripts/setup.sh
# installs Prism's own requirement files into a venv that sees the container's packages, exactly as on a
# bare machine, so the container's torch is never replaced.
#
#   docker build -t prism .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 -p 7860:7860 \
#     -v prism-hf:/data/huggingface -v prism-engines:/data/engine_cache \
#     -e HF_TOKEN -e PRISM_API_KEY prism --auth-file /run/secrets/prism-logins
#
# Arguments after the image name go to app.py (--auth, --models, --allow-origin ...). HF_TOKEN and
# PRISM_API_KEY come from `docker run`'s environment only: nothing secret is baked into the image.
# Named volumes (as above) start out owned by the image's user; to use host folders instead, make them
# writable by uid 10001 or run with --user "$(id -u):$(id -g)".
FROM nvcr.io/nvidia/pytorch:25.11-py3

# A user of our own: the server, the caches and anything a request reaches run without root. USER names it
# by number so that an orchestrator (runAsNonRoot) can verify it is not root.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin prism \
    && mkdir -p /app /data/huggingface /data/engine_cache \
    && chown -R prism:prism /app /data
ENV HF_HOME=/data/huggingface \
    PRISM_ENGINE_CACHE=/data/engine_cache \
    GRADIO_ANALYTICS_ENABLED=False \
    PYTHONUNBUFFERED=1
WORKDIR /app
USER 10001

COPY --chown=prism:prism requirements.txt requirements-tensorrt.txt ./
COPY --chown=prism:prism scripts/setup.sh scripts/
RUN bash scripts/setup.sh --tensorrt && rm -rf /home/prism/.cache/pip

COPY --chown=prism:prism app.py pyproject.toml ./
COPY --chown=prism:prism pipelines/ pipelines/
COPY --chown=prism:prism ui/ ui/
COPY --chown=prism:prism models/ models/
COPY --chown=prism:prism engine_cache/README.md /data/engine_cache/

# Downloaded weights and built engines outlive the container and are shared by its next versions.
VOLUME ["/data/huggingface", "/data/engine_cache"]
EXPOSE 7860
# /health answers 503 until the worker runs and the default model can run; it needs no API key.
# (It probes port 7860: keep that port inside the container and map another one outside if needed.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"]
ENTRYPOINT ["/app/.venv/bin/python", "app.py", "--host", "0.0.0.0", "--port", "7860"]
CMD []
