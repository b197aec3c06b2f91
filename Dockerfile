# syntax=docker/dockerfile:1
# cachesvc: the caching sidecar. Build: `docker build -t cachesvc .`
# Run: mount a config at /etc/cachesvc/cachesvc.toml (see deploy/compose/cachesvc.toml) and,
# for any bind other than 127.0.0.1, set CACHESVC_AUTH_TOKEN (docs/configuration.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: wheels for the package and every dependency ------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore keeps the context to what the package needs.
COPY . .
RUN pip wheel --wheel-dir /wheels .

# -- runtime: the installed package, nothing else ------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# --no-index: only the wheels built above; nothing is fetched, and no build tools remain.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links /wheels cachesvc \
    && groupadd --system --gid 10001 cachesvc \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin cachesvc \
    && mkdir -p /etc/cachesvc
# Numeric, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
USER 10001:10001
# The API; and the operations listener (/healthz, /readyz, /metrics) where a config sets
# [server] ops_port = 8788, as the compose and Kubernetes examples do.
EXPOSE 8787 8788
# No curl in the slim image: Python's urllib. urlopen raises (exit 1) on any non-2xx answer.
# It assumes the default port, 8787; a config that moves it needs its own check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/healthz', timeout=2)"]
ENTRYPOINT ["cachesvc"]
CMD ["serve", "--config", "/etc/cachesvc/cachesvc.toml"]
