"""Mutual-TLS channels, sync and asyncio, built from a `ClientConfig`."""

from __future__ import annotations

import grpc
import grpc.aio
from stopcovid.client.config import ClientConfig


def _credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=config.ca_cert_pem,
        private_key=config.client_key_pem,
        certificate_chain=config.client_cert_pem,
    )


def _options(config: ClientConfig) -> list[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = [
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
    ]
    if config.keepalive_time is not None:
        options += [
            ("grpc.keepalive_time_ms", round(config.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(config.keepalive_timeout * 1000)),
            ("grpc.keepalive_permit_without_calls", int(config.keepalive_without_calls)),
            # Without this, gRPC stops pinging after two pings with no data in between.
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if config.server_name_override is not None:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    return options


def secure_channel(config: ClientConfig) -> grpc.Channel:
    """A blocking channel to `config.target` over mutual TLS."""
    return grpc.secure_channel(config.target, _credentials(config), options=_options(config))


def aio_secure_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to `config.target` over mutual TLS."""
    return grpc.aio.secure_channel(config.target, _credentials(config), options=_options(config))
