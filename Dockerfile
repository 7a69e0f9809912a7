# The proxy as a container: waitress from the settings (`python wsgi.py`), production profile.
# Build: docker build -t llm-proxy .
# Run:   docker run --stop-timeout 30 -p 8000:8000 -v llm-proxy-data:/app/data \
#            -e PROXY_API_KEYS -e ADMIN_API_KEY -e OPENAI_API_KEY llm-proxy
# Production requires client keys: export PROXY_API_KEYS="id:key,id2:key2" first (a key from
# `python -m app.auth new-key`), or the proxy refuses to start (exit status 2). ADMIN_API_KEY
# opens /admin/* (keys made over HTTP, spend, the request log) and /debug/*; unset: both off.
# Keys, spend and the request log are in SQLite at /app/data/llm-proxy.db: the named volume
# keeps them across containers (without -v, Docker makes a new anonymous volume each run). With
# -e DATABASE_URL=postgresql://user:pass@host:5432/db they are in PostgreSQL instead, which
# several containers can share; -e DATABASE_ENABLED=false turns the database off.
FROM python:3.11-slim

# ENVIRONMENT=production applies settings.PRODUCTION_PROFILE: host 0.0.0.0, 256 threads,
# connection limit 2000, log level WARNING, client keys required. Override any setting with its
# env var (THREADS, CONNECTION_LIMIT, PORT...; docs/configuration.md lists them all).
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ENVIRONMENT=production \
    PORT=8000

WORKDIR /app

# A system user with no home and no shell; the code stays root-owned, so it cannot rewrite it.
# The one folder it may write: data/, where the default SQLite file (DATABASE_PATH,
# data/llm-proxy.db from the working directory) goes; without it the database could not be
# created in root-owned /app. .dockerignore keeps a local data/ out of the image.
RUN groupadd --system --gid 10001 llmproxy \
    && useradd --system --uid 10001 --gid llmproxy --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmproxy \
    && mkdir /app/data \
    && chown 10001:10001 /app/data

# Dependencies in their own layer: rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

# The database outlives the container: Docker mounts a volume here, a new one starting as a
# copy of this folder (so owned by 10001). A bind mount (-v "$PWD/data:/app/data") must be
# writable by uid 10001. Several replicas must share PostgreSQL instead: a file per container
# would split keys and spend (deploy/kubernetes/README.md).
VOLUME /app/data

# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8000

# No curl in slim: Python asks /health/live on $PORT. Liveness only: /health answers 503 when
# every provider's breaker is open, and restarting the container would not mend a provider.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/health/live', timeout=4)"]

# SIGTERM (and SIGINT) drain: new connections refused, requests in flight (streams too) given
# SHUTDOWN_GRACE seconds to finish, then exit 0. `docker stop` kills after 10 s unless
# told otherwise: --stop-timeout 30 above, stop_grace_period in docker-compose.yml.
STOPSIGNAL SIGTERM
CMD ["python", "wsgi.py"]
