# syntax=docker/dockerfile:1
# The Triton image: NVIDIA's Triton Inference Server, whose Python backend runs the models on the
# same Python, the same backend stub and the same locked packages as the tests' Triton
# (deploy/local/triton.py). The models' `model.py` (written by the services image's init
# container) imports the real model classes from /app/services.
#
#   docker build -f docker/triton.Dockerfile -t rlhf/triton:0.1.0 .         (from the repo root)
#
# Why not the image's own Python: release 24.10 is Ubuntu 22.04, whose Python-backend stub runs
# Python 3.10, and the lock needs 3.11 (torch, transformers and pydantic-settings declare
# Requires-Python >= 3.11; tests/unit/test_images.py checks every locked package against the
# images' Python). The nvidia-pytriton wheel in the lock carries the stub built for 3.11 against
# server 2.51.0, the server release 24.10 ships (tests/integration/test_triton_server.py checks the
# version against the server the tests run), so this image swaps that stub in and gives it
# Python 3.11 and the locked packages.

# NVIDIA's container release, and the server version it ships.
ARG TRITON_RELEASE=24.10
ARG TRITON_SERVER_VERSION=2.51.0
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS code
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install -c requirements.lock grpcio-tools protobuf
COPY protos/ protos/
COPY services/ services/
RUN rm -rf services/genproto && python protos/generate.py \
 && find /app -name '__pycache__' -prune -exec rm -rf {} +

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3
ARG PYTHON_VERSION
ARG TRITON_SERVER_VERSION
LABEL org.rlhf-platform.triton-server-version="${TRITON_SERVER_VERSION}" \
      org.rlhf-platform.python-backend-python="${PYTHON_VERSION}"
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Python 3.11 with its shared libpython (the stub links libpython3.11.so.1.0), from deadsnakes:
# Ubuntu 22.04's own python3.11 is a 3.11.0 pre-release build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      "python${PYTHON_VERSION}" "python${PYTHON_VERSION}-venv" "libpython${PYTHON_VERSION}" \
 && apt-get purge -y software-properties-common gpg-agent && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/*
# Exactly the tested packages (as `make setup` installs them), nvidia-pytriton's stubs included.
COPY requirements.lock /tmp/requirements.lock
RUN "python${PYTHON_VERSION}" -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r /tmp/requirements.lock \
 && rm /tmp/requirements.lock
ENV SITE_PACKAGES=/opt/venv/lib/python${PYTHON_VERSION}/site-packages
# The stub for this Python replaces the image's 3.10 one; its own libraries (auditwheel-renamed,
# so nothing of the image's is shadowed) come from the wheel's nvidia_pytriton.libs.
RUN cp "${SITE_PACKAGES}/pytriton/tritonserver/python_backend_stubs/${PYTHON_VERSION}/triton_python_backend_stub" \
      /opt/tritonserver/backends/python/triton_python_backend_stub
COPY --from=code /app/services /app/services
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app:${SITE_PACKAGES} \
    LD_LIBRARY_PATH=${LD_LIBRARY_PATH}:${SITE_PACKAGES}/nvidia_pytriton.libs \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
# NVIDIA's image ships the unprivileged user triton-server (uid 1000), the chart's runAsUser.
USER 1000:1000
ENTRYPOINT []
CMD ["tritonserver", "--model-repository=/model-repository", "--model-control-mode=explicit"]
