# Prometheus from Debian's package, for deploy/compose.yaml where no registry image is reachable
# (this repo's offline dev VM). With a registry you can use the upstream image instead:
# in compose.yaml replace the prometheus service's `build:` with `image: prom/prometheus:v2.53.2`.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
# DL3008: Debian's prometheus package version follows the base image's release (bookworm: 2.42).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.listen-address=127.0.0.1:9090"]
