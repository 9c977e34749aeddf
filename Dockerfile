# syncworker in a container:
#   docker build -t syncworker .
#   docker run --rm -e SYNCWORKER_DATABASE_URL=... syncworker migrate
#   docker run -d --stop-timeout 45 -e SYNCWORKER_DATABASE_URL=... syncworker      # `syncworker run`
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/syncworker
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system --no-create-home syncworker \
    && mkdir -p /opt/syncworker/jobs
# The modules of `python` jobs: install them in an image built FROM this one (pip install), or
# COPY or mount them into /opt/syncworker/jobs, which is on the module path.
ENV PYTHONPATH=/opt/syncworker/jobs
USER syncworker
# SIGTERM (docker stop) drains running jobs for SYNCWORKER_GRACE_PERIOD seconds (30 by
# default), then cancels the rest; Docker kills the container after `docker stop -t`
# seconds (10 by default): give -t, --stop-timeout or compose's stop_grace_period more than
# the grace period. A schema the worker cannot run on exits with status 78.
STOPSIGNAL SIGTERM
# --http serves /healthz, /readyz, /health, /metrics and the status page. On 127.0.0.1 it only
# answers the HEALTHCHECK; to scrape it from outside set SYNCWORKER_HTTP=0.0.0.0:9650 and
# SYNCWORKER_HTTP_TOKEN (or SYNCWORKER_HTTP_INSECURE=true on a private network).
ENV SYNCWORKER_HTTP=127.0.0.1:9650
EXPOSE 9650
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["syncworker", "healthcheck"]
ENTRYPOINT ["syncworker"]
CMD ["run"]
