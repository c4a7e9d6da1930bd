"""Write the API reference, docs/api-reference.md, from the protos' comments and options.

    python tools/apiref.py          # rewrite docs/api-reference.md
    python tools/apiref.py --check  # exit 1 if it differs from what the protos produce

The reference is rendered from the descriptors protoc compiles with source code info
(comments, declaration order), never from the .proto text, so what it says of a type,
field, role or idempotency level is what the compiler and the servers see. The roles
come from the `stopcovid.common.v1.allowed_roles` method option, read through a
descriptor pool built from the same compiled set, so the reference never depends on
the committed gen/ tree being current.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc_tools
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
REFERENCE = ROOT / "docs" / "api-reference.md"

ROLES_OPTION = "stopcovid.common.v1.allowed_roles"
ERROR_REASON = "stopcovid.common.v1.ErrorReason"
ERROR_DOMAIN = "stopcovid.gov.kh"

# Field numbers in descriptor.proto, the steps of a SourceCodeInfo.Location path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_EXTENSION = 4, 5, 6, 7
_MESSAGE_FIELD, _MESSAGE_NESTED, _MESSAGE_ENUM, _MESSAGE_ONEOF = 2, 3, 4, 8
_ENUM_VALUE, _SERVICE_METHOD = 2, 2

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    number: name.removeprefix("TYPE_").lower()
    for name, number in _FDP.Type.items()
    if number not in (_FDP.TYPE_MESSAGE, _FDP.TYPE_ENUM, _FDP.TYPE_GROUP)
}
_IDEMPOTENCY = {
    descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN: (
        "not declared: a retry may repeat the call's effect, so the typed clients do not retry it"
    ),
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS: (
        "`NO_SIDE_EFFECTS`: changes nothing; safe to retry (the typed clients retry it on "
        "`UNAVAILABLE`)"
    ),
    descriptor_pb2.MethodOptions.IDEMPOTENT: (
        "`IDEMPOTENT`: repeating it has the effect of one call; safe to retry (the typed "
        "clients retry it on `UNAVAILABLE`)"
    ),
}
_STATUS_CODES = {code.name for code in grpc.StatusCode}

HEADER = f"""\
# Stop COVID API reference

Every service, RPC, message, field and enum of the v1 API, with the roles allowed to call
each RPC and whether it is safe to retry. Generated from the comments and options in
`protos/` by `./dev gen` (`tools/apiref.py`); a test fails when this file and the protos
disagree, so edit the protos, not this file. From Python, install the `stopcovid-client`
distribution (typed clients over these messages, `stopcovid.<service>.v1`; the README's
"Typed clients"); to generate code for another language from the same protos, see
[other-languages.md](other-languages.md).

<a id="calling-the-api"></a>
## Calling the API

- **Transport.** gRPC over mutual TLS. Every call presents a client certificate issued by
  the platform's certificate authority: its subject's CN is the caller's principal name,
  its OU a [`Role`](#stopcovid.common.v1.Role) value name (for example
  `ROLE_HEALTH_OFFICIAL`). A call without such a certificate fails in the TLS handshake,
  which gRPC reports as `UNAVAILABLE`. Each RPC below lists the roles allowed to call it;
  any other role gets `PERMISSION_DENIED` with reason `ROLE_NOT_ALLOWED`.
- **Errors.** A refused or failed call carries a `google.rpc.Status` in the
  `grpc-status-details-bin` trailer, holding one `google.rpc.ErrorInfo` whose `domain` is
  `{ERROR_DOMAIN}` and whose `reason` is one of the [error reasons](#errors); when one
  field is at fault, also a `google.rpc.BadRequest` naming it (and `ErrorInfo.metadata`
  has it under `field`). Branch on the status code and the reason, never on the message,
  which is for people and never contains personal data.
- **Errors every RPC may give**, besides those its description names: `UNAUTHENTICATED`
  (`UNAUTHENTICATED`), `PERMISSION_DENIED` (`ROLE_NOT_ALLOWED`), `INVALID_ARGUMENT`
  (`INVALID_ARGUMENT`, naming the field) for a missing or malformed field or a request
  that does not parse, `UNAVAILABLE` (`BACKEND_UNAVAILABLE`) when the database is
  unreachable, and `INTERNAL` (`INTERNAL`). A request larger than the server's limit
  (4 MiB by default) is refused by gRPC itself with `RESOURCE_EXHAUSTED` and no
  `ErrorInfo`.
- **Retries.** An RPC marked `NO_SIDE_EFFECTS` or `IDEMPOTENT` may be retried as it is.
  The others that create something take an optional `request_id` (a UUID the caller
  chooses): a retry with the same `request_id` returns the first call's result.
- **Lists** are paged: `page_size` (0 means the default), then the response's
  `next_page_token` as the next request's `page_token`, with the same filters, until it
  comes back empty. A `page_size` above the maximum is `INVALID_ARGUMENT`; a token from
  another query, or with other filters, is `INVALID_ARGUMENT` (`INVALID_PAGE_TOKEN`).
- **Ids** are opaque strings (UUIDs unless the field says otherwise); an id that is not
  a UUID is `INVALID_ARGUMENT`, an unknown one `NOT_FOUND`. Instants are
  `google.protobuf.Timestamp`, spans `google.protobuf.Duration`, and partial updates name
  their fields in a `google.protobuf.FieldMask`: the protobuf well-known types, which
  every protobuf runtime provides. Calendar dates are `"YYYY-MM-DD"` strings in Cambodia
  time (Asia/Phnom_Penh, UTC+07:00).
- **JSON** (for example with `grpcurl -d`) uses the standard proto3 JSON mapping: field
  names in lowerCamelCase or as written here, enum values by name.
"""


def compile_descriptors(
    proto_root: Path = PROTOS,
) -> tuple[descriptor_pb2.FileDescriptorSet, list[str]]:
    """Compile every .proto under proto_root with source code info and its imports.

    Returns the set and the names of the files found under proto_root (the ones to
    document; the imports are there to resolve types and options)."""
    sources = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.binpb"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "grpc_tools.protoc",
                f"--proto_path={proto_root}",
                f"--proto_path={well_known}",
                "--include_imports",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *sources,
            ],
            cwd=proto_root,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.stderr.write(done.stdout + done.stderr)
            raise SystemExit(f"protoc failed with exit code {done.returncode}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()), sources


@dataclass(frozen=True)
class _Comment:
    leading: str
    trailing: str

    def paragraphs(self) -> list[str]:
        """The leading then the trailing comment, as Markdown paragraphs."""
        found: list[str] = []
        for text in (self.leading, self.trailing):
            found += [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
        return found


def _clean(raw: str) -> str:
    return textwrap.dedent(raw).strip("\n")


def _escape(text: str, *, cell: bool = False) -> str:
    """Keep comment text literal in Markdown: `<id>` is not an HTML tag, and a `|` does
    not split a table cell. Code spans are left as written (only `|` is escaped there,
    which GitHub's tables require)."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        piece = part
        if i % 2 == 0:
            piece = piece.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        if cell:
            piece = piece.replace("|", "\\|")
        out.append(piece)
    return "".join(out)


def walk_messages(
    messages: Iterable[descriptor_pb2.DescriptorProto], outer: str = ""
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    """Each message with its name within the package ("Outer.Inner" when nested)."""
    for message in messages:
        name = f"{outer}{message.name}"
        yield name, message
        yield from walk_messages(message.nested_type, f"{name}.")


def _anchor(full_name: str) -> str:
    return f'<a id="{full_name}"></a>'


class Reference:
    """The API of a compiled descriptor set, rendered as one Markdown document."""

    def __init__(self, files: descriptor_pb2.FileDescriptorSet, documented: Iterable[str]):
        self._files = {f.name: f for f in files.file}
        self._documented = [self._files[name] for name in sorted(documented)]
        pool = descriptor_pool.DescriptorPool()
        for proto in files.file:
            pool.Add(proto)
        self._pool = pool
        self._method_options = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("google.protobuf.MethodOptions")
        )
        # Full name (".pkg.Type") -> (package, name within the package) of each type
        # documented here; any other type (well-known types) is named, not linked.
        self._types: dict[str, tuple[str, str]] = {}
        self._map_entries: dict[str, descriptor_pb2.DescriptorProto] = {}
        self._comments: dict[tuple[str, tuple[int, ...]], _Comment] = {}
        for proto in self._documented:
            for location in proto.source_code_info.location:
                self._comments[(proto.name, tuple(location.path))] = _Comment(
                    _clean(location.leading_comments), _clean(location.trailing_comments)
                )
            for name, message in walk_messages(proto.message_type):
                if message.options.map_entry:
                    self._map_entries[f".{proto.package}.{name}"] = message
                else:
                    self._types[f".{proto.package}.{name}"] = (proto.package, name)
                for enum in message.enum_type:
                    self._types[f".{proto.package}.{name}.{enum.name}"] = (
                        proto.package,
                        f"{name}.{enum.name}",
                    )
            for enum in proto.enum_type:
                self._types[f".{proto.package}.{enum.name}"] = (proto.package, enum.name)

    # -- pieces -------------------------------------------------------------------

    def _comment(self, file: str, path: Sequence[int]) -> _Comment:
        return self._comments.get((file, tuple(path)), _Comment("", ""))

    def _block(self, file: str, path: Sequence[int], deprecated: bool = False) -> list[str]:
        paragraphs = [_escape(p) for p in self._comment(file, path).paragraphs()]
        if deprecated:
            paragraphs.insert(0, "**Deprecated.**")
        return [line for p in paragraphs for line in (p, "")]

    def _cell(self, file: str, path: Sequence[int], prefix: str = "") -> str:
        paragraphs = [" ".join(p.split()) for p in self._comment(file, path).paragraphs()]
        text = "<br><br>".join(_escape(p, cell=True) for p in paragraphs)
        return f"{prefix} {text}".strip() if prefix else text

    def _type_link(self, type_name: str, package: str) -> str:
        """A type as a reader sees it: a link to its section, or a well-known type by
        name. Types of the reader's package are named without the package."""
        known = self._types.get(type_name)
        if known is None:
            return f"`{type_name.lstrip('.')}`"
        owner, name = known
        shown = name if owner == package else f"{owner}.{name}"
        return f"[`{shown}`](#{type_name.lstrip('.')})"

    def _field_type(self, field: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
        if field.type in (_FDP.TYPE_MESSAGE, _FDP.TYPE_ENUM):
            entry = self._map_entries.get(field.type_name)
            if entry is not None:
                key, value = entry.field
                return (
                    f"map&lt;{self._field_type(key, package)}, "
                    f"{self._field_type(value, package)}&gt;"
                )
            shown = self._type_link(field.type_name, package)
        else:
            shown = f"`{_SCALARS[field.type]}`"
        if field.label == _FDP.LABEL_REPEATED:
            return f"repeated {shown}"
        if field.proto3_optional:
            return f"optional {shown}"
        return shown

    def roles(self, method: descriptor_pb2.MethodDescriptorProto) -> list[str]:
        """The Role value names allowed to call the method, in the enum's order."""
        options = self._method_options.FromString(method.options.SerializeToString())
        for field, values in options.ListFields():
            if field.full_name == ROLES_OPTION and field.enum_type is not None:
                role = field.enum_type
                return [role.values_by_number[v].name for v in sorted(set(values))]
        return []

    # -- sections -----------------------------------------------------------------

    @staticmethod
    def _heading(
        kind: str, proto: descriptor_pb2.FileDescriptorProto, name: str, level: str = "###"
    ) -> Iterator[str]:
        """A section's anchor (the element's full name) and heading."""
        yield _anchor(f"{proto.package}.{name}")
        yield f"{level} {kind} `{name}`"
        yield ""

    def _signature(
        self, method: descriptor_pb2.MethodDescriptorProto, package: str
    ) -> tuple[str, str, str]:
        """The request and response types (marked when streamed) and the roles."""
        request = self._type_link(method.input_type, package)
        response = self._type_link(method.output_type, package)
        return (
            f"stream {request}" if method.client_streaming else request,
            f"stream {response}" if method.server_streaming else response,
            ", ".join(f"`{r}`" for r in self.roles(method)),
        )

    def _service(self, proto: descriptor_pb2.FileDescriptorProto, index: int) -> Iterator[str]:
        service = proto.service[index]
        full = f"{proto.package}.{service.name}"
        path = [_FILE_SERVICE, index]
        yield from self._heading("service", proto, service.name)
        yield from self._block(proto.name, path, service.options.deprecated)
        yield "| RPC | request | response | roles |"
        yield "|---|---|---|---|"
        for method in service.method:
            request, response, roles = self._signature(method, proto.package)
            link = f"[`{method.name}`](#{full}.{method.name})"
            yield f"| {link} | {request} | {response} | {roles or 'nobody'} |"
        yield ""
        for i, method in enumerate(service.method):
            yield from self._heading("rpc", proto, f"{service.name}.{method.name}", "####")
            request, response, roles = self._signature(method, proto.package)
            yield f"- **Method:** `/{full}/{method.name}`"
            yield f"- **Request:** {request}"
            yield f"- **Response:** {response}"
            yield f"- **Roles:** {roles or 'nobody (refused to every caller)'}"
            yield f"- **Idempotency:** {_IDEMPOTENCY[method.options.idempotency_level]}"
            yield ""
            yield from self._block(
                proto.name, [*path, _SERVICE_METHOD, i], method.options.deprecated
            )

    def _message(
        self,
        proto: descriptor_pb2.FileDescriptorProto,
        message: descriptor_pb2.DescriptorProto,
        name: str,
        path: list[int],
    ) -> Iterator[str]:
        yield from self._heading("message", proto, name)
        yield from self._block(proto.name, path, message.options.deprecated)
        if message.field:
            yield "| field | type | number | description |"
            yield "|---|---|---|---|"
        real_oneofs = {
            f.oneof_index
            for f in message.field
            if f.HasField("oneof_index") and not f.proto3_optional
        }
        shown_oneofs: set[int] = set()
        for i, field in enumerate(message.field):
            in_oneof = field.HasField("oneof_index") and field.oneof_index in real_oneofs
            if in_oneof and field.oneof_index not in shown_oneofs:
                shown_oneofs.add(field.oneof_index)
                oneof = message.oneof_decl[field.oneof_index]
                oneof_path = [*path, _MESSAGE_ONEOF, field.oneof_index]
                text = self._cell(proto.name, oneof_path)
                yield (
                    f"| **oneof** `{oneof.name}` | at most one of the fields below "
                    f"marked `{oneof.name}` | | {text} |"
                )
            prefix = f"(oneof `{message.oneof_decl[field.oneof_index].name}`)" if in_oneof else ""
            if field.options.deprecated:
                prefix = f"**Deprecated.** {prefix}".strip()
            text = self._cell(proto.name, [*path, _MESSAGE_FIELD, i], prefix)
            shown_type = self._field_type(field, proto.package)
            yield f"| `{field.name}` | {shown_type} | {field.number} | {text} |"
        if message.field:
            yield ""
        for i, enum in enumerate(message.enum_type):
            yield from self._enum(proto, enum, f"{name}.{enum.name}", [*path, _MESSAGE_ENUM, i])
        for i, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                yield from self._message(
                    proto, nested, f"{name}.{nested.name}", [*path, _MESSAGE_NESTED, i]
                )

    def _enum(
        self,
        proto: descriptor_pb2.FileDescriptorProto,
        enum: descriptor_pb2.EnumDescriptorProto,
        name: str,
        path: list[int],
    ) -> Iterator[str]:
        yield from self._heading("enum", proto, name)
        yield from self._block(proto.name, path, enum.options.deprecated)
        yield "| value | number | description |"
        yield "|---|---|---|"
        for i, value in enumerate(enum.value):
            prefix = "**Deprecated.**" if value.options.deprecated else ""
            text = self._cell(proto.name, [*path, _ENUM_VALUE, i], prefix)
            yield f"| `{value.name}` | {value.number} | {text} |"
        yield ""

    def _extension(self, proto: descriptor_pb2.FileDescriptorProto, index: int) -> Iterator[str]:
        extension = proto.extension[index]
        yield from self._heading("extension", proto, extension.name)
        yield (
            f"Extends `{extension.extendee.lstrip('.')}` with field `{extension.name}` "
            f"({extension.number}), of type {self._field_type(extension, proto.package)}."
        )
        yield ""
        yield from self._block(proto.name, [_FILE_EXTENSION, index], extension.options.deprecated)

    def _declaration_line(self, proto: descriptor_pb2.FileDescriptorProto, path: list[int]) -> int:
        for location in proto.source_code_info.location:
            if list(location.path) == path:
                return location.span[0]
        return 0

    def _types_in_order(self, proto: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
        """Top-level messages and enums in the order the file declares them, which keeps
        an enum beside the messages that use it."""
        found: list[tuple[int, Iterator[str]]] = []
        for i, message in enumerate(proto.message_type):
            path = [_FILE_MESSAGE, i]
            lines = self._message(proto, message, message.name, path)
            found.append((self._declaration_line(proto, path), lines))
        for i, enum in enumerate(proto.enum_type):
            path = [_FILE_ENUM, i]
            found.append(
                (self._declaration_line(proto, path), self._enum(proto, enum, enum.name, path))
            )
        for _, lines in sorted(found, key=lambda item: item[0]):
            yield from lines

    def errors(self) -> Iterator[str]:
        """The ErrorInfo reasons, with the status code each comes with."""
        enum = self._pool.FindEnumTypeByName(ERROR_REASON)
        file = self._files[enum.file.name]
        index = [e.name for e in file.enum_type].index(enum.name)
        yield '<a id="errors"></a>'
        yield "## Errors"
        yield ""
        yield f"From [`ErrorReason`](#{ERROR_REASON}):"
        yield ""
        yield from self._block(file.name, [_FILE_ENUM, index])
        yield "| reason | status code | meaning |"
        yield "|---|---|---|"
        for i, value in enumerate(enum.values):
            if value.number == 0:
                continue
            text = self._cell(file.name, [_FILE_ENUM, index, _ENUM_VALUE, i])
            code, _, rest = text.partition(": ")
            if code not in _STATUS_CODES:
                code, rest = "", text
            reason = value.name.removeprefix("ERROR_REASON_")
            shown_code = f"`{code}`" if code else ""
            yield f"| `{reason}` | {shown_code} | {rest[:1].upper()}{rest[1:]} |"
        yield ""

    def markdown(self) -> str:
        packages: dict[str, list[descriptor_pb2.FileDescriptorProto]] = defaultdict(list)
        for proto in self._documented:
            packages[proto.package].append(proto)
        lines = [HEADER, "## Contents", ""]
        lines.append("- [Calling the API](#calling-the-api)")
        has_errors = f".{ERROR_REASON}" in self._types
        if has_errors:
            lines.append("- [Errors](#errors)")
        for package, protos in sorted(packages.items()):
            lines.append(f"- package [`{package}`](#{package})")
            for proto in protos:
                for service in proto.service:
                    full = f"{package}.{service.name}"
                    rpcs = ", ".join(f"[`{m.name}`](#{full}.{m.name})" for m in service.method)
                    lines.append(f"  - service [`{service.name}`](#{full}): {rpcs}")
        lines.append("")
        if has_errors:
            lines += self.errors()
        for package, protos in sorted(packages.items()):
            lines += [_anchor(package), f"## package `{package}`", ""]
            files = ", ".join(f"`protos/{p.name}`" for p in protos)
            lines += [f"Defined in {files}.", ""]
            names = sorted(n for p, n in self._types.values() if p == package and "." not in n)
            links = ", ".join(f"[`{n}`](#{package}.{n})" for n in names)
            lines += [f"Types: {links}.", ""]
            for proto in protos:
                for i in range(len(proto.service)):
                    lines += self._service(proto, i)
                for i in range(len(proto.extension)):
                    lines += self._extension(proto, i)
            for proto in protos:
                lines += self._types_in_order(proto)
        return "\n".join(lines).rstrip("\n") + "\n"


def reference(proto_root: Path = PROTOS) -> Reference:
    files, sources = compile_descriptors(proto_root)
    return Reference(files, sources)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    args = parser.parse_args()
    text = reference().markdown()
    shown = REFERENCE.relative_to(ROOT)
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != text:
            print(f"{shown} differs from the protos; run: ./dev gen", file=sys.stderr)
            return 1
        print(f"{shown} is up to date")
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
