# The service in a container: README.md, "Deploy". No compiler, no curl, no tests: the service's modules,
# their hash-pinned dependencies, and a non-root user. Runs with a read-only root filesystem (only /tmp,
# a tmpfs, is writable; nothing is written there either unless a feature needs it).
#
# The base is pinned to an exact Python patch release; pin it by digest too at build time (README shows how):
#   docker build --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest you looked up> .
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm
FROM ${PYTHON_IMAGE}

# Optional extras, each its own hash-pinned file: uvloop and httptools (requirements-fast.txt), Prometheus
# metrics (requirements-metrics.txt) and Redis quotas (requirements-redis.txt). "true" installs one.
ARG WITH_FAST=false
ARG WITH_METRICS=false
ARG WITH_REDIS=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    HOST=0.0.0.0 \
    PORT=8000

WORKDIR /app

# A glob, so the build works whichever optional files exist; requirements.txt always matches, and
# .dockerignore keeps requirements-dev.txt out of the context. install.txt names the chosen files (paths in it
# are relative to it), so pip sees one -r.
COPY requirements*.txt /tmp/requirements/
RUN set -eu; \
    echo "-r requirements.txt" > /tmp/requirements/install.txt; \
    for extra in "fast=$WITH_FAST" "metrics=$WITH_METRICS" "redis=$WITH_REDIS"; do \
        name="${extra%%=*}"; \
        case "${extra#*=}" in \
            true) echo "-r requirements-$name.txt" >> /tmp/requirements/install.txt ;; \
            false) ;; \
            *) echo "build argument WITH_$name must be true or false" >&2; exit 1 ;; \
        esac; \
    done; \
    pip install --require-hashes --no-deps --no-cache-dir -r /tmp/requirements/install.txt; \
    rm -r /tmp/requirements; \
    groupadd --system --gid 10001 groq-proxy; \
    useradd --system --uid 10001 --gid groq-proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin groq-proxy

# The service's modules only (.dockerignore admits nothing else), compiled now: the filesystem is read-only later.
COPY *.py ./
RUN python -m compileall -q /app

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "app.py"]
