"""Connecting to a secured Kafka: TLS and SASL options for every client editd makes, and a
check at start that fails in seconds, naming the setting, instead of a consumer that retries
for ever against a broker that will never accept it.

`client_options(kafka)` is the one translation of the `kafka.*` security settings into
kafka-python keyword arguments; the consumer, its dead-letter producer, the rejected-facts
publisher, topic creation and `editd publish` all pass it. Secrets come from the settings
(environment `EDITD_KAFKA__SASL_PASSWORD`) or a file, and are never logged.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editd.config import KafkaSettings


class KafkaSecurityError(RuntimeError):
    """The security settings cannot work; the message names the `kafka.*` setting to fix."""


def sasl_password(kafka: KafkaSettings) -> str | None:
    if kafka.sasl_password is not None:
        return kafka.sasl_password.get_secret_value()
    if kafka.sasl_password_file is not None:
        try:
            return Path(kafka.sasl_password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise KafkaSecurityError(f"kafka.sasl_password_file: cannot read it: {exc}") from exc
    return None


def client_options(kafka: KafkaSettings) -> dict[str, Any]:
    """kafka-python options for the configured protocol (empty for PLAINTEXT)."""
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        for setting in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            path = getattr(kafka, setting)
            if path is not None:
                if not Path(path).is_file():
                    raise KafkaSecurityError(f"kafka.{setting}: {path} does not exist")
                options[setting] = str(path)
        options["ssl_check_hostname"] = kafka.ssl_check_hostname
    if protocol.startswith("SASL"):
        password = sasl_password(kafka)
        missing = [
            name
            for name, value in (
                ("sasl_mechanism", kafka.sasl_mechanism),
                ("sasl_username", kafka.sasl_username),
                ("sasl_password", password),
            )
            if not value
        ]
        if missing:
            raise KafkaSecurityError(
                f"kafka.security_protocol is {protocol} but kafka.{', kafka.'.join(missing)} "
                "is not set"
            )
        options.update(
            sasl_mechanism=kafka.sasl_mechanism,
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=password,
        )
    return options


def check_connection(
    servers: Sequence[str], kafka: KafkaSettings, timeout_s: float | None = None
) -> None:
    """Fail fast, naming the setting, when the brokers cannot be reached with these settings.

    Each step waits at most `timeout_s` (default `kafka.connect_timeout_ms`): a TCP connection
    to one of the bootstrap servers (nothing listening is named as such, in milliseconds when
    the port refuses); for TLS, Python's own handshake against it (a wrong CA or a plaintext
    listener is named precisely); then Kafka's own handshake through kafka-python, which also
    checks SASL credentials.
    """
    timeout = kafka.connect_timeout_ms / 1000 if timeout_s is None else timeout_s
    options = client_options(kafka)
    reachable = _check_reachable(servers, timeout)
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        _check_tls(reachable, options, timeout)
    _check_kafka(servers, options, timeout, kafka.security_protocol)


def _check_reachable(servers: Sequence[str], timeout_s: float) -> list[str]:
    """The bootstrap servers that accept a TCP connection, first; none is a
    `KafkaSecurityError` naming `kafka.bootstrap_servers`."""
    deadline = time.monotonic() + timeout_s
    errors = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            left = max(0.1, deadline - time.monotonic())
            with socket.create_connection((host.strip("[]"), int(port)), timeout=left):
                return [server, *(s for s in servers if s != server)]
        except (OSError, ValueError) as exc:
            errors.append(f"{server}: {exc}")
    raise KafkaSecurityError(
        f"kafka.bootstrap_servers: no broker reachable within {timeout_s:g}s ({'; '.join(errors)})"
    )


def _check_tls(servers: Sequence[str], options: dict[str, Any], timeout_s: float) -> None:
    context = ssl.create_default_context(cafile=options.get("ssl_cafile"))
    context.check_hostname = bool(options.get("ssl_check_hostname", True))
    if "ssl_certfile" in options:
        try:
            context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        except (ssl.SSLError, OSError) as exc:
            raise KafkaSecurityError(
                f"kafka.ssl_certfile / kafka.ssl_keyfile: cannot load the client certificate: {exc}"
            ) from exc
    errors = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout_s)
        except OSError as exc:
            errors.append(f"{server}: {exc}")
            continue
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return
        except ssl.SSLCertVerificationError as exc:
            raise KafkaSecurityError(
                f"kafka.ssl_cafile: {server} presented a certificate that "
                f"{options.get('ssl_cafile') or 'the system CAs'} do not verify: "
                f"{exc.verify_message}"
            ) from exc
        except (ssl.SSLError, OSError) as exc:
            raise KafkaSecurityError(
                f"kafka.security_protocol: the TLS handshake with {server} failed ({exc}); "
                "is it a TLS listener?"
            ) from exc
        finally:
            raw.close()
    raise KafkaSecurityError(f"kafka.bootstrap_servers: none answered: {'; '.join(errors)}")


def _check_kafka(
    servers: Sequence[str], options: dict[str, Any], timeout_s: float, protocol: str
) -> None:
    import logging

    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError, SaslAuthenticationFailedError

    ms = int(timeout_s * 1000)
    # kafka-python logs each failed attempt; the one line that matters is the error below.
    quiet = logging.getLogger("kafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=list(servers),
            request_timeout_ms=ms,
            bootstrap_timeout_ms=ms,
            **options,
        )
    except SaslAuthenticationFailedError as exc:
        raise KafkaSecurityError(
            "kafka.sasl_username / kafka.sasl_password: the broker rejected the credentials"
        ) from exc
    except KafkaError as exc:
        setting = (
            "kafka.bootstrap_servers" if protocol == "PLAINTEXT" else "kafka.security_protocol"
        )
        raise KafkaSecurityError(
            f"{setting}: {','.join(servers)} accepted a connection but no Kafka answered "
            f"within {timeout_s:g}s as {protocol} ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        quiet.setLevel(level)
    admin.close()
