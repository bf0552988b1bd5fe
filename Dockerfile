# The service in a container: README.md, "Deploy". No compiler, no curl, no tests: the service's modules,
# their hash-pinned dependencies in a venv, and a non-root user. Runs with a read-only root filesystem (only
# /tmp, a tmpfs, is writable; nothing is written there either unless a feature needs it).
#
# The base is pinned to an exact Python patch release; pin it by digest too at build time (README shows how):
#   docker build --build-arg PYTHON_IMAGE=python:3.11.17-slim-bookworm@sha256:<digest you looked up> .
# Any Debian 12 image with python3 and python3-venv works (the tests build on one made with debootstrap).
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

# The dependencies, installed into /opt/venv in a stage of their own: the image copies the venv, so neither
# the wheel files nor pip's downloads end up in one of its layers.
FROM ${PYTHON_IMAGE} AS dependencies

# Optional extras, each its own hash-pinned file: httptools and aiohttp (requirements-fast.txt), Prometheus
# metrics (requirements-metrics.txt) and Redis quotas (requirements-redis.txt). "true" installs one.
ARG WITH_FAST=false
ARG WITH_METRICS=false
ARG WITH_REDIS=false
# "true" installs from the wheelhouse in wheels/ alone (bash scripts/wheelhouse.sh fills it), never from an
# index: the build then needs no network (README, "Container").
ARG OFFLINE=false

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A glob, so the build works whichever optional files exist; requirements.txt always matches, and
# .dockerignore keeps requirements-dev.txt out of the context. install.txt names the chosen files (paths in it
# are relative to it), so pip sees one -r.
COPY requirements*.txt /tmp/requirements/
COPY wheels/ /tmp/wheels/
RUN set -eu; \
    echo "-r requirements.txt" > /tmp/requirements/install.txt; \
    extra() { \
        case "$2" in \
            true) echo "-r requirements-$1.txt" >> /tmp/requirements/install.txt ;; \
            false) ;; \
            *) echo "build argument $3 must be true or false" >&2; exit 1 ;; \
        esac; \
    }; \
    extra fast "$WITH_FAST" WITH_FAST; \
    extra metrics "$WITH_METRICS" WITH_METRICS; \
    extra redis "$WITH_REDIS" WITH_REDIS; \
    case "$OFFLINE" in \
        true) set -- --no-index --find-links /tmp/wheels ;; \
        false) set -- ;; \
        *) echo "build argument OFFLINE must be true or false" >&2; exit 1 ;; \
    esac; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --require-hashes --no-deps --no-cache-dir "$@" -r /tmp/requirements/install.txt

FROM ${PYTHON_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HOST=0.0.0.0 \
    PORT=8000

COPY --from=dependencies /opt/venv /opt/venv
RUN groupadd --system --gid 10001 groq-proxy \
    && useradd --system --uid 10001 --gid groq-proxy --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin groq-proxy

# The service's modules and the quota's Lua scripts only (.dockerignore admits nothing else), compiled now: the
# filesystem is read-only later.
WORKDIR /app
COPY *.py ./
COPY quota_lua/ ./quota_lua/
RUN python -m compileall -q /app

USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
# Every 5 s: Docker's first check runs one interval after the start, and compose starts nginx only once both
# replicas are healthy.
HEALTHCHECK --interval=5s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"]
CMD ["python", "app.py"]
