"""Type names for gRPC server code.

grpc's stubs make contexts and handlers generic in the request and response
types; servicers and the interceptor use these aliases instead of repeating them.
"""

import datetime as dt
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

if TYPE_CHECKING:  # the classes are generic only in the stubs, not at run time
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler


def unimplemented(servicer_class: type[Any]) -> Any:
    """An instance of a generated servicer base class. The stubs declare its methods
    abstract, but at run time each raises NotImplementedError, which the interceptor
    answers with UNIMPLEMENTED (after the role check)."""
    return servicer_class()


def duration(value: dt.timedelta) -> duration_pb2.Duration:
    """A protobuf Duration of a timedelta (as read from an interval column)."""
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp of an aware datetime (as read from a timestamptz column)."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts
