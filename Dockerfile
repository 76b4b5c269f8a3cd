FROM python:3.11-slim

# libmagic: files' real types are read from their content (python-magic).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libmagic1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/eimis-bridge
COPY pyproject.toml README.md ./
COPY bridge ./bridge
COPY connectors ./connectors
# The message catalogs are compiled into the image (bridge/i18n.py).
RUN pip install --no-cache-dir . \
    && python -m bridge.devtools.catalogs compile \
    && useradd --system --home-dir /data --shell /usr/sbin/nologin eimis \
    && mkdir -p /data && chown eimis /data

USER eimis
WORKDIR /data
VOLUME /data
EXPOSE 29340
ENTRYPOINT ["eimis-bridge"]
CMD ["run", "-c", "/data/config.yaml"]
