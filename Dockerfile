# syntax=docker/dockerfile:1
#
# The tuner image: one image for the worker, the one-shot `tuner create` and the dashboard.
#
#   docker build -t tuner-worker:latest .
#   docker run --rm --gpus all -e TUNER_STORAGE=postgresql+psycopg2://tuner@db:5432/tuner \
#       -e PGPASSWORD=... tuner-worker:latest worker --study digits-demo --gpus all
#
# Base image: python:3.11-slim-bookworm, pinned to an exact patch release, plus the pip package
# tensorflow[and-cuda]==2.21.0, which brings the CUDA and cuDNN libraries TensorFlow 2.21 was
# built against as pip wheels (nvidia-*-cu12). This was chosen over tensorflow/tensorflow:*-gpu
# because (1) that image decides the Python version for us and already holds a system-wide
# TensorFlow that we would install over, and (2) the pip wheels are the CUDA build the
# TensorFlow team tests, so no apt repository or CUDA toolkit is needed. The host needs only
# the NVIDIA driver and the NVIDIA Container Toolkit; without a GPU the same image runs on CPU.
#
# Building needs BuildKit (the default builder of Docker 23 and later, and of `docker compose`).

# ---- builder: turn the source tree into a wheel -------------------------------------------
FROM python:3.11.14-slim-bookworm AS builder

WORKDIR /src
COPY . .
# --no-deps: only the project's own wheel; its dependencies are installed from PyPI below.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- final: the wheel and its dependencies in a virtual environment, run as a non-root user -
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="tuner" \
      org.opencontainers.image.description="Hyperparameter search worker: dropout, L2 and augmentation for Keras models on a shared Optuna study" \
      org.opencontainers.image.licenses="MIT"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The wheel is bind-mounted from the builder stage, so not even it stays in a layer. It is
# installed as a regular (non-editable) package; --no-cache-dir keeps pip's cache out.
RUN --mount=type=bind,from=builder,source=/wheels,target=/tmp/wheels \
    python -m venv /opt/venv \
    && pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0" /tmp/wheels/*.whl \
    && tuner --version

# uid 1000 so files written to bind mounts belong to the usual first user of the host.
# /artifacts and ~/.keras exist (owned by that user) before a named volume is mounted there,
# so Docker gives a new volume the same owner and the non-root user can write to it.
RUN useradd --no-log-init --create-home --uid 1000 --user-group --shell /usr/sbin/nologin tuner \
    && mkdir -p /app/studies /artifacts /home/tuner/.keras \
    && chown tuner:tuner /artifacts /home/tuner/.keras

WORKDIR /app
# Numeric, so that runtimes which check "runs as non-root" (Kubernetes) can verify it.
USER 1000:1000

# optuna-dashboard (`tuner dashboard --host 0.0.0.0`).
EXPOSE 8080

ENTRYPOINT ["tuner"]
CMD ["--help"]
