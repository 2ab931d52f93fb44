# mozrest-relay: `docker build -t mozrest-relay .`
# BASE_IMAGE is for CI, which cannot pull and builds on a stand-in of the same Debian release and
# Python (scripts/container_check.sh); everyone else gets the official image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# Build stage: install the pinned dependencies into a virtual environment.
FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.lock pyproject.toml README.md ./
COPY app ./app
COPY migrations ./migrations
COPY mozrest_outbox ./mozrest_outbox
# With the `otel` extra: tracing stays off until OTEL_* asks for it (docs/platform.md).
RUN pip install --constraint requirements.lock ".[otel]"

# Final stage: the interpreter, the virtual environment, a non-root user; no compilers.
FROM ${BASE_IMAGE}
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAY_HOST=0.0.0.0 \
    RELAY_PORT=8000
WORKDIR /tmp
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('RELAY_PORT', '8000')}/healthz\", timeout=2)"]
ENTRYPOINT ["mozrest-relay"]
# Migrations run as a one-shot: `docker run --rm -e DATABASE_URL=... mozrest-relay migrate`.
CMD ["run"]
