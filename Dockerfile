# Konnichiwa: one image, two roles (`docker build --build-arg SERVICE=aux` for the aux role).
# Stage 1 builds the wheels of the service and its dependencies; stage 2 installs them only.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY konnichiwa ./konnichiwa
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Locust for the compose `load` profile and the Kubernetes load test (`--target load`).
FROM build AS load
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[load]" \
    && pip install --no-cache-dir --no-index /wheels/*.whl
COPY loadtests ./loadtests
USER 65534:65534
EXPOSE 8089 5557
ENTRYPOINT ["locust", "-f", "loadtests/locustfile.py"]

FROM python:3.11.14-slim-bookworm AS service
ARG SERVICE=api
LABEL org.opencontainers.image.title="konnichiwa"
# The root filesystem may be mounted read-only: bytecode is compiled at install time, and the
# only writable paths are /tmp and the state volume (used by the embedded dev stack only, which
# this image does not install).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SERVICE_NAME=${SERVICE} \
    ENVIRONMENT=prod \
    PORT=4000 \
    LOG_FORMAT=json \
    KONNICHIWA_STATE_DIR=/var/lib/konnichiwa
RUN groupadd --system --gid 10001 konnichiwa \
    && useradd --system --uid 10001 --gid konnichiwa --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin konnichiwa \
    && install -d -o konnichiwa -g konnichiwa -m 0700 /var/lib/konnichiwa
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/konnichiwa-*.whl
VOLUME ["/var/lib/konnichiwa", "/tmp"]
USER 10001:10001
WORKDIR /var/lib/konnichiwa
EXPOSE 4000
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '4000') + '/health', timeout=2)"]
CMD ["konnichiwa", "serve"]
