# syntax=docker/dockerfile:1
# The services image: every gRPC service (policy, reward, reference), the rollout worker, the
# trainer, the gateway and the curator, plus the init container that writes a Triton model
# repository. One image; the Helm chart picks the entry point per container.
#
#   docker build -f docker/services.Dockerfile -t rlhf/services:0.1.0 .     (from the repo root)

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Exact versions from the lock, without resolving again (as `make setup` installs them).
COPY requirements.lock ./
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-deps -r requirements.lock
COPY protos/ protos/
COPY services/ services/
# Generated code is never committed: make it here, from the protos in this build.
RUN rm -rf services/genproto && /opt/venv/bin/python protos/generate.py \
 && find /app -name '__pycache__' -prune -exec rm -rf {} +

FROM python:3.11-slim
RUN groupadd --gid 1000 rlhf \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin rlhf
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/services /app/services
COPY --from=build /app/protos /app/protos
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false
WORKDIR /app
# Runs with a read-only root filesystem: only /tmp (and the chart's volumes) are writable.
USER 1000:1000
# The chart sets the command per container; this is the policy service.
CMD ["python", "-m", "services.policy"]
