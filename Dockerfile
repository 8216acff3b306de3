# sftpvault: SFTP with encryption at rest.
# State (config, keys, encrypted data) lives in the volume /var/lib/sftpvault.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SFTPVAULT_HOME=/var/lib/sftpvault

WORKDIR /opt/sftpvault
COPY setup.cfg pyproject.toml README.md ./
COPY sftpvault ./sftpvault
RUN pip install --no-cache-dir . \
    && useradd --system --home-dir /var/lib/sftpvault --shell /usr/sbin/nologin sftpvault \
    && mkdir -p /var/lib/sftpvault \
    && chown sftpvault:sftpvault /var/lib/sftpvault \
    && chmod 0700 /var/lib/sftpvault

USER sftpvault
VOLUME ["/var/lib/sftpvault"]
EXPOSE 2222
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import socket; socket.create_connection(('127.0.0.1', 2222), 3).recv(4)"
ENTRYPOINT ["sftpvault"]
CMD ["serve", "--host", "0.0.0.0", "--port", "2222"]
