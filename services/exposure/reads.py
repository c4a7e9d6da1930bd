"""The Exposure RPCs that only read, Get and List in the sense of Google's API
design guide: GetCase, GetAccessRequest and GetTrace by id; ListCases,
ListAccessRequests, ListTraces and ListNotifications a page at a time.

Each is declared by what it reads (`GETS`, `LISTS`: a query and the message of
one record) and answered one way, its request read as the proto describes it:

- a Get request's one field is the id: INVALID_ARGUMENT when it is malformed,
  NOT_FOUND naming the resource (the field's name without `_id`) for none;
- a List request's page size is checked first, then each other field in the
  proto's order, as the query's filter of the same name: a `*_id` string is an
  optional UUID, an enum its database word (convert.EnumMap), a TimeRange the
  query's `start` and `end`; then the page token, which must come from the same
  filters (queries.page).

The response's one other field holds the message(s). `ReadRpcs` has a method for
each, made at import; a read of a method the service does not have, or a request
field of another kind, fails there rather than in a call.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from stopcovid.exposure.v1 import exposure_service_pb2 as pb

from services.domain.exposure.records import Record
from services.exposure import convert, queries
from services.exposure.base import ExposureBase
from services.kernel import pagination, validation
from services.kernel.rpc import Context

R = TypeVar("R", bound=Record)

SERVICE = pb.DESCRIPTOR.services_by_name["ExposureService"]
PAGE_FIELDS = ("page_size", "page_token")


@dataclass(frozen=True)
class Get(Generic[R]):
    """A read of one record by its id."""

    query: Callable[[queries.Db, uuid.UUID], Awaitable[R | None]]
    message: Callable[[R], Any]


@dataclass(frozen=True)
class List(Generic[R]):
    """A read of a page of records."""

    keyset: queries.Keyset[R]
    message: Callable[[R], Any]


GETS: dict[str, Get[Any]] = {
    "GetCase": Get(queries.get_case, convert.case),
    "GetAccessRequest": Get(queries.get_access_request, convert.access_request),
    "GetTrace": Get(queries.get_trace, convert.trace),
}
LISTS: dict[str, List[Any]] = {
    "ListCases": List(queries.CASES, convert.case),
    "ListAccessRequests": List(queries.ACCESS_REQUESTS, convert.access_request),
    "ListTraces": List(queries.TRACES, convert.trace),
    "ListNotifications": List(queries.NOTIFICATIONS, convert.notification),
}

Filter = Callable[[Any], dict[str, Any]]
"""The query parameters one request field gives, checked."""


def _filter(field: FieldDescriptor) -> Filter:
    name = field.name
    if field.enum_type is not None:
        words = convert.ENUMS[field.enum_type.name]
        return lambda request: {name: words.filter(getattr(request, name), name)}
    if field.message_type is not None and field.message_type.name == "TimeRange":

        def bounds(request: Any) -> dict[str, Any]:
            start, end = convert.bounds(getattr(request, name), name)
            return {"start": start, "end": end}

        return bounds
    if field.type == FieldDescriptor.TYPE_STRING and name.endswith("_id"):
        return lambda request: {name: validation.optional_uuid(getattr(request, name), name)}
    raise TypeError(f"{field.full_name}: no filter of this kind")


def _content(response: Descriptor) -> str:
    """The response field that holds the message(s)."""
    (field,) = (f.name for f in response.fields if f.name != "next_page_token")
    return field


def _get_rpc(method: str, read: Get[Any]) -> Callable[..., Awaitable[Any]]:
    described = SERVICE.methods_by_name[method]
    (id_field,) = (f.name for f in described.input_type.fields)
    response, content = GetMessageClass(described.output_type), _content(described.output_type)

    async def rpc(self: ReadRpcs, request: Any, context: Context) -> Any:
        found = await read.query(
            self._pool, validation.uuid_id(getattr(request, id_field), id_field)
        )
        if found is None:
            raise convert.not_found(id_field.removesuffix("_id"))
        return response(**{content: read.message(found)})

    return rpc


def _list_rpc(method: str, read: List[Any]) -> Callable[..., Awaitable[Any]]:
    described = SERVICE.methods_by_name[method]
    filters = [_filter(f) for f in described.input_type.fields if f.name not in PAGE_FIELDS]
    response, content = GetMessageClass(described.output_type), _content(described.output_type)

    async def rpc(self: ReadRpcs, request: Any, context: Context) -> Any:
        size = pagination.page_size(request.page_size)
        where = {
            name: value for read_filter in filters for name, value in read_filter(request).items()
        }
        found, token = await queries.page(self._pool, read.keyset, request.page_token, size, where)
        return response(**{content: [read.message(r) for r in found]}, next_page_token=token)

    return rpc


class ReadRpcs(ExposureBase):
    """GETS and LISTS, a method each (made below)."""


for _method, _rpc in [
    *((m, _get_rpc(m, r)) for m, r in GETS.items()),
    *((m, _list_rpc(m, r)) for m, r in LISTS.items()),
]:
    _rpc.__name__ = _rpc.__qualname__ = _method
    setattr(ReadRpcs, _method, _rpc)
