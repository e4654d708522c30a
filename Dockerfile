# deq-serve: the gRPC server with the bundled `digits` demo model.
#
#   docker build -t deq-serve .                       # CUDA-enabled PyTorch runtime base
#   docker build --build-arg BASE_IMAGE=<image> .     # any base with Python >= 3.11 and torch
#
# BASE_IMAGE must already hold torch (2.3 <= version < 2.15; 2.9 or later to serve .pt2 packages):
# the install below pins pip to the torch it finds, so pip never swaps in another (multi-GB) build.
ARG BASE_IMAGE=pytorch/pytorch:2.9.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY pyproject.toml README.md /tmp/deq-serve/
COPY client /tmp/deq-serve/client
COPY server /tmp/deq-serve/server
RUN python -c 'from importlib.metadata import version; print("torch==" + version("torch"))' \
        > /tmp/torch-pin.txt \
    && python -m pip install --no-cache-dir --constraint /tmp/torch-pin.txt "/tmp/deq-serve[server]" \
    && rm -rf /tmp/deq-serve /tmp/torch-pin.txt \
    && useradd --system --no-log-init --uid 10001 --user-group --create-home --home-dir /home/deq deq \
    && mkdir -p /models \
    && chown deq:deq /models

# Listen on every interface inside the container (the server's own default is loopback). With no
# checkpoint in /models (no volume mounted, or an empty one) the bundled demo model is served;
# Train commits land in /models, so mount a volume there to keep them.
ENV DEQ_ADDRESS=0.0.0.0:50051 \
    DEQ_METRICS_ADDRESS=0.0.0.0:9090 \
    DEQ_MODEL_DIR=/models \
    DEQ_DEVICE=auto \
    DEQ_GRACE_SECONDS=10 \
    DEQ_LOG_FORMAT=json

USER 10001:10001
WORKDIR /home/deq
EXPOSE 50051 9090

# The probe asks grpc.health.v1 at DEQ_ADDRESS (on loopback): SERVING once the models are loaded,
# NOT_SERVING while draining.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["deq-healthcheck", "--timeout", "3"]

# SIGTERM drains: health turns NOT_SERVING, new calls are refused and in-flight ones get
# DEQ_GRACE_SECONDS to finish, then the process exits 0. Give the engine a longer stop timeout
# than the grace (compose: stop_grace_period; docker run/stop: --stop-timeout / --time).
STOPSIGNAL SIGTERM
ENTRYPOINT ["deq-server"]
