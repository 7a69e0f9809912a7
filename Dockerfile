# The proxy as a container: waitress from the settings (`python wsgi.py`), production profile.
# Build: docker build -t llm-proxy .
# Run:   docker run --stop-timeout 30 -p 8000:8000 -e PROXY_API_KEYS -e OPENAI_API_KEY llm-proxy
# Production requires client keys: export PROXY_API_KEYS="id:key,id2:key2" first (a key from
# `python -m app.auth new-key`), or the proxy refuses to start (exit status 2).
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
RUN groupadd --system --gid 10001 llmproxy \
    && useradd --system --uid 10001 --gid llmproxy --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin llmproxy

# Dependencies in their own layer: rebuilt only when requirements.txt changes.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt

COPY . .

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
