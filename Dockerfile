# The proxy as a container: waitress from the settings (`python wsgi.py`), production profile.
# Build: docker build -t llm-proxy .    Run: docker run -p 8000:8000 -e OPENAI_API_KEY llm-proxy
FROM python:3.11-slim

# ENVIRONMENT=production applies settings.PRODUCTION_PROFILE: host 0.0.0.0, 64 threads,
# connection limit 2000, log level WARNING. Override any setting with its env var
# (THREADS, CONNECTION_LIMIT, PORT...; docs/operations.md lists them all).
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

# Python as PID 1 ignores SIGTERM (no handler, and PID 1 gets no default action), but SIGINT
# raises KeyboardInterrupt, which waitress turns into a clean exit: `docker stop` takes
# milliseconds instead of the 10 s kill timeout.
STOPSIGNAL SIGINT
CMD ["python", "wsgi.py"]
