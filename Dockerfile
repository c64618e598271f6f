# syntax=docker/dockerfile:1
# Meterline's image: `docker build -t meterline .`, then see compose.yaml and
# docs/production.md. The container runs `meterline serve --host 0.0.0.0` as an unprivileged
# user; its data directory (/var/lib/meterline: the usage spool and journal) is a volume.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- builder: the virtualenv, with the runtime dependencies at the lock's versions --------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/meterline
WORKDIR /app
# Dependencies first, so a change of code alone rebuilds from the next step: the runtime
# lock's pins (not the test and bench extras of requirements.lock), without its last line,
# `-e .`, which needs the code (installed below).
COPY pyproject.toml requirements-runtime.lock ./
RUN grep -v '^-e ' requirements-runtime.lock > /tmp/runtime.txt \
 && /opt/meterline/bin/pip install -r /tmp/runtime.txt
COPY README.md alembic.ini ./
COPY pricing ./pricing
COPY service ./service
COPY migrations ./migrations
# Installed in place rather than as a wheel: the migrations (and alembic.ini) live beside
# the packages, where `meterline db upgrade` finds them. Compiled now, as the runtime user
# cannot write __pycache__ into /app.
RUN /opt/meterline/bin/pip install --no-deps -e . \
 && /opt/meterline/bin/python -m compileall -q /app/service /app/pricing /app/migrations

# -- runtime: the virtualenv and the code, nothing to build with ---------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/meterline/bin:$PATH \
    METERLINE_HOST=0.0.0.0 \
    METERLINE_PORT=8080 \
    METERLINE_DATA_DIR=/var/lib/meterline
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/meterline --create-home \
        --shell /usr/sbin/nologin meterline
COPY --from=builder /opt/meterline /opt/meterline
COPY --from=builder /app /app
WORKDIR /var/lib/meterline
# By id, so Kubernetes' runAsNonRoot can verify it (the user is `meterline`).
USER 10001:10001
# The spool and journal of this replica: usage not yet in Postgres lives here. Give each
# replica a volume of its own that outlives the container (docs/production.md).
VOLUME ["/var/lib/meterline"]
EXPOSE 8080
# 200 while the replica can serve, also while Postgres is down (usage is then spooled).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('METERLINE_PORT', '8080'); sys.exit(urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4).status != 200)"]
# SIGTERM: in-flight requests finish, the ledger queue drains, then the process exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["meterline"]
CMD ["serve", "--host", "0.0.0.0"]
