# syntax=docker/dockerfile:1
# The Triton image: NVIDIA's Triton Inference Server plus what the Python-backend models need.
# The models' `model.py` (written by the services image's init container) imports the real model
# classes from /app/services, so this image carries the same code under the same path.
#
#   docker build -f docker/triton.Dockerfile -t rlhf/triton:0.1.0 .         (from the repo root)
#
# Triton 24.10 is Ubuntu 22.04 with Python 3.10, and its Python-backend stub runs that Python:
# the deps below are installed for it, held to the versions in requirements.lock (-c).

FROM python:3.11-slim AS code
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install -c requirements.lock grpcio-tools protobuf
COPY protos/ protos/
COPY services/ services/
RUN rm -rf services/genproto && python protos/generate.py \
 && find /app -name '__pycache__' -prune -exec rm -rf {} +

FROM nvcr.io/nvidia/tritonserver:24.10-py3
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock /tmp/requirements.lock
RUN python3 -m pip install -c /tmp/requirements.lock \
      torch transformers safetensors tokenizers gguf numpy \
      pydantic pydantic-settings protobuf grpcio "tritonclient[grpc]" prometheus-client \
 && rm /tmp/requirements.lock
COPY --from=code /app/services /app/services
ENV PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
# NVIDIA's image ships the unprivileged user triton-server (uid 1000), the chart's runAsUser.
USER 1000:1000
ENTRYPOINT []
CMD ["tritonserver", "--model-repository=/model-repository", "--model-control-mode=explicit"]
