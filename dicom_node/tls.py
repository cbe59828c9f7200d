"""DICOM TLS (PS3.15 Annex B, BCP 195 profile): SSL contexts for the TLS listener and for sending.

Why here, beside config: both the listener (receive/) and the sender (deliver/) need them, and both must fail
at start with the configuration key named, not at the first association. Python's ``ssl`` module (OpenSSL):
TLS 1.2 or 1.3 only, forward-secret AEAD cipher suites for TLS 1.2 (RFC 9325), certificates verified against
the configured CA bundle; the listener can require a client certificate (mutual authentication, what DICOM
TLS between sites usually means).
"""

from __future__ import annotations

import ssl

from .config import ConfigError, Destination, ScpTlsSettings

#: TLS 1.2 suites allowed by BCP 195 / RFC 9325 (ECDHE or DHE key exchange, AES-GCM or ChaCha20-Poly1305).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return ctx


def _load_chain(ctx: ssl.SSLContext, cert_key: str, cert: str, key_key: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigError(f"{cert_key} / {key_key}: file not found ({exc.filename or cert})") from None
    except PermissionError as exc:
        raise ConfigError(f"{cert_key} / {key_key}: not readable ({exc.filename or cert})") from None
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_key} / {key_key}: not a PEM certificate and its matching unencrypted private key "
                          f"({exc.reason or exc})") from None


def _load_ca(ctx: ssl.SSLContext, key: str, path: str) -> None:
    try:
        ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: not a readable PEM CA bundle ({getattr(exc, 'reason', None) or exc})") from None


def server_context(cfg: ScpTlsSettings, key: str = "scp.tls") -> ssl.SSLContext:
    """The TLS listener's context: our certificate and key; client certificates checked against the CAs."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    _load_chain(ctx, f"{key}.certificate", cfg.certificate, f"{key}.private_key", cfg.private_key)
    if cfg.ca_certificates:
        _load_ca(ctx, f"{key}.ca_certificates", cfg.ca_certificates)
    ctx.verify_mode = ssl.CERT_REQUIRED if cfg.require_client_certificate else (
        ssl.CERT_OPTIONAL if cfg.ca_certificates else ssl.CERT_NONE)
    return ctx


def client_context(dest: Destination, key: str = "destinations") -> ssl.SSLContext:
    """Context for sending to ``dest``: its certificate must chain to ``tls_ca`` (else the system's CAs) and
    name ``tls_server_name`` (else ``host``); our client certificate if one is configured."""
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if dest.tls_ca:
        _load_ca(ctx, f"{key}.tls_ca", dest.tls_ca)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if dest.tls_certificate:
        _load_chain(ctx, f"{key}.tls_certificate", dest.tls_certificate, f"{key}.tls_private_key", dest.tls_private_key)
    return ctx


def server_name(dest: Destination) -> str:
    return dest.tls_server_name or dest.host
