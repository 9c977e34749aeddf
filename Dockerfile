# syncworker in a container: `docker run -e SYNCWORKER_DATABASE_URL=... syncworker run`
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /opt/syncworker
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system --no-create-home syncworker
USER syncworker
# SIGTERM drains running jobs for SYNCWORKER_GRACE_PERIOD seconds: give `docker stop -t` more than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["syncworker"]
CMD ["run"]
