# Credential Broker image: `broker serve` as a non-root user. No key and no configuration are
# baked in; pass them at run time (docs/deployment.md, "Docker"; deploy/ for compose and Kubernetes).
#
# Ports:   50051  gRPC (BROKER_LISTEN)
#          9464   Prometheus metrics, when BROKER_METRICS_LISTEN=0.0.0.0:9464
# Volumes: /var/lib/broker  the working directory; holds the SQLite file if you use SQLite
#                           (PostgreSQL needs nothing here; the root filesystem may be read-only)
#          /etc/broker      mount settings (BROKER_CONFIG), the keyring file and TLS files here,
#                           read-only
# Health:  `broker health` asks the gRPC health service on BROKER_LISTEN (0.0.0.0 read as
#          127.0.0.1); healthy only while it answers SERVING, i.e. while the database answers.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/broker \
 && /opt/broker/bin/pip install "pip==26.3"
WORKDIR /src
# README.md is the package's long description (pyproject.toml), so the build needs it.
COPY pyproject.toml constraints.txt README.md ./
# The client distribution holds the generated protobuf/gRPC code the server imports.
COPY clients/python ./clients/python
COPY broker ./broker
RUN /opt/broker/bin/pip install -c constraints.txt ./clients/python .

FROM python:3.11-slim
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid broker --home-dir /var/lib/broker --create-home \
      --shell /usr/sbin/nologin broker
COPY --from=builder /opt/broker /opt/broker
ENV PATH=/opt/broker/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKER_LISTEN=0.0.0.0:50051
# A non-loopback listen address needs TLS (BROKER_TLS_CERT_FILE, BROKER_TLS_KEY_FILE) or
# BROKER_SERVER__ALLOW_INSECURE=true behind a mesh that encrypts; the broker refuses otherwise.
WORKDIR /var/lib/broker
USER 10001:10001
EXPOSE 50051 9464
VOLUME ["/var/lib/broker"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["broker", "health", "--timeout", "3"]
ENTRYPOINT ["broker"]
CMD ["serve"]
