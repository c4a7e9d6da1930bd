"""Calls to the real servers below the typed clients: any method by its descriptor,
any request bytes (valid or not), as any principal, answering the status code, the
ErrorInfo reason and the field violations, so that hostile-input tests can see
exactly what a hostile client would."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from stopcovid.client import ClientConfig
from stopcovid.client._channel import secure_channel

from tests.support.servers import Servers


@dataclass(frozen=True)
class Outcome:
    """How a call ended."""

    code: grpc.StatusCode
    reason: str = ""
    fields: tuple[str, ...] = ()
    message: str = ""
    size: int = 0
    """Bytes of the status message and details together, as the caller received them."""
    replies: list[bytes] = field(default_factory=list)


def _outcome(err: grpc.RpcError) -> Outcome:
    call: grpc.Call = err  # type: ignore[assignment]
    message = call.details() or ""
    status = rpc_status.from_call(call)
    reason, fields, size = "", [], len(message.encode())
    if status is not None:
        size += status.ByteSize()
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            if detail.Unpack(info):
                reason = info.reason
            elif detail.Unpack(bad):
                fields += [violation.field for violation in bad.field_violations]
    return Outcome(call.code(), reason, tuple(fields), message, size)


class Caller:
    """Channels to the four servers as principals, made on first use."""

    def __init__(self, servers: Servers) -> None:
        self._servers = servers
        self._channels: dict[tuple[str, str], grpc.Channel] = {}

    def channel(self, service: str, principal: str) -> grpc.Channel:
        key = (service, principal)
        if key not in self._channels:
            config = ClientConfig.from_pki_dir(
                self._servers.target(service), self._servers.pki.dir, principal
            )
            self._channels[key] = secure_channel(config)
        return self._channels[key]

    def call(
        self,
        service: str,
        principal: str,
        method: MethodDescriptor,
        request: Message | bytes,
        *,
        timeout: float = 30.0,
        stream: list[Message | bytes] | None = None,
    ) -> Outcome:
        """Call `method` with `request` (or, for a client-streaming method, the
        messages of `stream`, `request` first); bytes are sent as they are."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        channel = self.channel(service, principal)

        def serialize(message: Message | bytes) -> bytes:
            return message if isinstance(message, bytes) else message.SerializeToString()

        def raw(data: bytes) -> bytes:
            return data

        try:
            if method.client_streaming:
                messages = [request, *(stream or [])]
                if method.server_streaming:
                    call = channel.stream_stream(path, serialize, raw)
                    replies = list(call(iter(messages), timeout=timeout))
                else:
                    replies = [
                        channel.stream_unary(path, serialize, raw)(iter(messages), timeout=timeout)
                    ]
            elif method.server_streaming:
                replies = list(channel.unary_stream(path, serialize, raw)(request, timeout=timeout))
            else:
                replies = [channel.unary_unary(path, serialize, raw)(request, timeout=timeout)]
        except grpc.RpcError as err:
            return _outcome(err)
        return Outcome(grpc.StatusCode.OK, replies=replies)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


@contextmanager
def caller(servers: Servers) -> Iterator[Caller]:
    made = Caller(servers)
    try:
        yield made
    finally:
        made.close()
