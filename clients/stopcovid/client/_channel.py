"""Mutual-TLS channels, sync and asyncio, built from a `ClientConfig`.

A target of several comma-separated addresses ("host1:50051,host2:50051") makes one
channel over all of them, balanced round robin per call (a device's stream stays on
the server it started on until it ends or the server asks it to reconnect); a
server that is down is skipped. Each host is resolved once, to IPv4 addresses, when
the channel is made; the server certificates are checked against the first host's
name (every server's certificate must carry it, as the development ones carry
`localhost`), unless `server_name_override` names another.
"""

from __future__ import annotations

import json
import socket

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


_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"an address in a list of servers must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def balanced_target(target: str) -> tuple[str, list[tuple[str, str | int]]]:
    """`target` as gRPC takes it, and the options that go with it: as it is for one
    address; for several, an `ipv4:` list of every address they resolve to, balanced
    round robin, with the first host as the authority the certificates must name."""
    addresses = [a for a in target.split(",") if a.strip()]
    if len(addresses) < 2:
        return target, []
    resolved: list[str] = []
    for address in addresses:
        host, port = _split(address)
        for *_, sockaddr in socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM):
            ip = sockaddr[0]
            assert isinstance(ip, str)  # AF_INET: (address, port)
            entry = f"{ip}:{port}"
            if entry not in resolved:
                resolved.append(entry)
    first_host, first_port = _split(addresses[0])
    return "ipv4:" + ",".join(resolved), [
        ("grpc.service_config", _ROUND_ROBIN),
        ("grpc.default_authority", f"{first_host}:{first_port}"),
    ]


def secure_channel(config: ClientConfig) -> grpc.Channel:
    """A blocking channel to `config.target` over mutual TLS."""
    target, balancing = balanced_target(config.target)
    return grpc.secure_channel(target, _credentials(config), options=_options(config) + balancing)


def aio_secure_channel(config: ClientConfig) -> grpc.aio.Channel:
    """An asyncio channel to `config.target` over mutual TLS."""
    target, balancing = balanced_target(config.target)
    return grpc.aio.secure_channel(
        target, _credentials(config), options=_options(config) + balancing
    )
