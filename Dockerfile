# runlater container image.
#   docker build -t runlater .
#   docker run --ulimit nofile=262144:262144 -p 8080:8080 -e DATABASE_URL=postgresql://… runlater
# Without DATABASE_URL the embedded PostgreSQL keeps its data in /data (mount a volume there).
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY runlater ./runlater
RUN pip install '.[embedded]' && useradd --system --create-home --home-dir /data runlater
USER runlater
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8080
# The default --host is loopback; a container must listen on all interfaces.
ENTRYPOINT ["runlater"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--data-dir", "/data"]
