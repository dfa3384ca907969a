"""TLS for the gRPC port, with certificates that reload without a restart.

``PARLEY_TLS_CERT_FILE`` and ``PARLEY_TLS_KEY_FILE`` (PEM) turn TLS on; ``PARLEY_TLS_CLIENT_CA_FILE``
also requires every client to present a certificate signed by that CA (mutual TLS). gRPC asks for
the certificates on every new connection (``grpc.dynamic_ssl_server_credentials``): when a file has
changed since (or after SIGHUP), they are read again, so a renewed certificate (cert-manager,
certbot) is used by the next connection; connections already open keep theirs. Files that no longer
load (half written, mismatched) leave the certificates in use as they were, and the log says why.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

__all__ = ["ServerCertificates", "TLSError"]

log = logging.getLogger(__name__)


class TLSError(Exception):
    """The certificate files cannot be used (the message says which and why)."""


class ServerCertificates:
    """The server's certificate, key and optional client CA, read from files."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None = None) -> None:
        self._files = (cert_file, key_file, *((client_ca_file,) if client_ca_file else ()))
        self._cert_file, self._key_file, self._client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._stamps = self._stamp()
        self._forced = False
        self._initial = self._configuration()  # raises TLSError at start-up

    @property
    def mutual(self) -> bool:
        return self._client_ca_file is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=self.mutual
        )

    def reload_now(self) -> None:
        """Read the files again at the next connection, changed or not (SIGHUP)."""
        with self._lock:
            self._forced = True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback, on its own threads, for each new connection: a new configuration, or None
        to keep the one in use."""
        with self._lock:
            stamps = self._stamp()
            if stamps == self._stamps and not self._forced:
                return None
            self._stamps, self._forced = stamps, False
            try:
                configuration = self._configuration()
            except TLSError as error:
                log.error("TLS certificates not reloaded (%s); the ones in use stay", error)
                return None
        log.info("TLS certificates reloaded from %s", self._cert_file)
        return configuration

    def _stamp(self) -> tuple[int, ...]:
        stamps = []
        for path in self._files:
            try:
                stat = path.stat()
                stamps += [stat.st_mtime_ns, stat.st_size, stat.st_ino]
            except OSError:
                stamps += [-1, -1, -1]
        return tuple(stamps)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self._read(self._cert_file), self._read(self._key_file)
        if b"CERTIFICATE" not in cert or b"PRIVATE KEY" not in key:
            raise TLSError(f"{self._cert_file} must hold a PEM certificate and {self._key_file} a PEM private key")
        if not _key_matches(self._cert_file, self._key_file):
            raise TLSError(f"the private key in {self._key_file} is not the certificate's in {self._cert_file}")
        ca = self._read(self._client_ca_file) if self._client_ca_file else None
        if ca is not None and b"CERTIFICATE" not in ca:
            raise TLSError(f"{self._client_ca_file} must hold PEM CA certificates")
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as error:
            raise TLSError(f"cannot read {path}: {error.strerror}") from error


def _key_matches(cert_file: Path, key_file: Path) -> bool:
    """Whether the key is the certificate's (checked by the standard library's TLS on the files)."""
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError):
        return False
    return True
