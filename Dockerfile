# precogx-sidecar: build with `docker build -t precogx-sidecar .`
# The spool lives on the volume; mount a config file and point PRECOGX_SIDECAR_CONFIG
# at it, or configure everything with PRECOGX_SIDECAR_<SECTION>_<KEY> variables.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
# Wheels for the sidecar and its dependencies (uvloop included), built once here so
# the final image needs no compiler and no network.
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[speed]'

FROM python:3.12-slim
# No --system (it warns: 10001 is above SYS_UID_MAX) and no --create-home (it would copy
# /etc/skel's dot files into every spool volume).
RUN groupadd --gid 10001 precogx \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin \
        --home-dir /var/lib/precogx-sidecar precogx \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/precogx-sidecar
COPY --from=build /wheels /wheels
# Every wheel in /wheels was built above for exactly this install (the versions PyPI
# had then: pin them in a constraints file for reproducible images).
RUN pip install --no-cache-dir --no-index /wheels/*.whl \
    && rm -rf /wheels
# Inside a container the sidecar must be reachable from Dify's containers, so it
# listens on all addresses: it then refuses to start without an ingest token
# (PRECOGX_SIDECAR_INGEST_TOKEN), by design.
ENV PRECOGX_SIDECAR_SERVER_HOST=0.0.0.0 \
    PRECOGX_SIDECAR_SPOOL_PATH=/var/lib/precogx-sidecar/spool.db \
    PRECOGX_SIDECAR_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/precogx-sidecar
VOLUME ["/var/lib/precogx-sidecar"]
EXPOSE 8787
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["precogx-sidecar", "healthcheck"]
# Exec form: SIGTERM reaches the sidecar itself, which then shuts down in stages.
ENTRYPOINT ["precogx-sidecar"]
CMD ["run"]
