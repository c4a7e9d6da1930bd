"""The docs match the code: the README documents every setting the processes read, and
the API reference is what the protos say."""

from __future__ import annotations

import re
from pathlib import Path

from tools import apiref

ROOT = Path(__file__).resolve().parent.parent


def test_every_setting_is_in_the_readme_configuration_table() -> None:
    config = (ROOT / "services/kernel/config.py").read_text()
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration") :]
    table = table[: table.index("\n## ")]
    names = set(re.findall(r'"(STOPCOVID_[A-Z0-9_]+)"', config))
    assert len(names) > 40
    # A row may name several variables sharing a prefix: `STOPCOVID_X_A`, `_B`.
    documented = set(re.findall(r"STOPCOVID_[A-Z0-9_]+", table))
    shared = re.findall(r"`(STOPCOVID_[A-Z0-9_]+?)_[A-Z0-9]+`((?:, `_[A-Z0-9_]+`)+)", table)
    for first, rest in shared:
        documented |= {first + suffix for suffix in re.findall(r"`(_[A-Z0-9_]+)`", rest)}
    missing = sorted(names - documented)
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_every_error_reason_the_servers_give_is_in_the_api() -> None:
    """Callers branch on ErrorInfo.reason, so each one the code gives must be an
    ErrorReason value (without its prefix)."""
    from stopcovid.common.v1 import common_pb2

    names = common_pb2.ErrorReason.DESCRIPTOR.values_by_name
    known = {name.removeprefix("ERROR_REASON_") for name in names}
    given: set[str] = set()
    for path in (ROOT / "services").rglob("*.py"):
        source = path.read_text()
        given |= set(re.findall(r'\breason="([A-Z_]+)"', source))
        given |= set(re.findall(r'^\s+reason(?::\s*str)? = "([A-Z_]+)"', source, re.M))
    assert len(given) > 15
    assert given <= known, f"reasons not in stopcovid.common.v1.ErrorReason: {given - known}"


# -- the API reference (docs/api-reference.md, tools/apiref.py) -------------------------


def _sections(markdown: str) -> dict[str, str]:
    """Each anchor's text, up to the next anchor."""
    parts = re.split(r'<a id="([^"]+)"></a>\n', markdown)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_api_reference_matches_the_protos() -> None:
    committed = (ROOT / "docs" / "api-reference.md").read_text()
    assert committed == apiref.reference().markdown(), "run: ./dev gen"


def test_api_reference_has_every_element_the_roles_the_servers_enforce_and_no_dead_link() -> None:
    from services.kernel import auth
    from services.ops import setup

    files, sources = apiref.compile_descriptors()
    markdown = apiref.Reference(files, sources).markdown()
    sections = _sections(markdown)
    links = set(re.findall(r"\]\(#([^)]+)\)", markdown))
    assert len(links) > 200
    assert links <= set(sections), f"links to no section: {sorted(links - set(sections))}"

    enforced = auth.role_table(setup.SERVICE_DESCRIPTORS.values())
    documented = [f for f in files.file if f.name in sources]
    rpcs = 0
    for proto in documented:
        for service in proto.service:
            assert f"{proto.package}.{service.name}" in sections
            for method in service.method:
                text = sections[f"{proto.package}.{service.name}.{method.name}"]
                shown = re.search(r"- \*\*Roles:\*\* (.*)", text)
                assert shown is not None, method.name
                roles = set(re.findall(r"`(ROLE_[A-Z_]+)`", shown.group(1)))
                assert roles == enforced[f"/{proto.package}.{service.name}/{method.name}"]
                rpcs += 1
        for name, message in apiref.walk_messages(proto.message_type):
            if message.options.map_entry:
                continue
            text = sections[f"{proto.package}.{name}"]
            for field in message.field:
                assert f"| `{field.name}` |" in text, f"{name}.{field.name}"
        enums = [(e.name, e) for e in proto.enum_type]
        enums += [
            (f"{name}.{e.name}", e)
            for name, m in apiref.walk_messages(proto.message_type)
            for e in m.enum_type
        ]
        for name, enum in enums:
            text = sections[f"{proto.package}.{name}"]
            for value in enum.value:
                assert f"| `{value.name}` | {value.number} |" in text, value.name
    assert rpcs == len(enforced) > 50

    from stopcovid.common.v1 import common_pb2

    errors_table = sections["errors"]
    for name, number in common_pb2.ErrorReason.items():
        if number:
            reason = name.removeprefix("ERROR_REASON_")
            row = re.search(rf"^\| `{reason}` \| `([A-Z_]+)` \|", errors_table, re.M)
            assert row is not None, f"{reason} has no row with a status code"


SAMPLE = """\
syntax = "proto3";

package sample.v1;

import "google/protobuf/timestamp.proto";
import "other/v1/other.proto";
import "stopcovid/common/v1/auth.proto";

// Watches things.
service SampleService {
  // Streams things.
  rpc Watch(stream WatchRequest) returns (stream Thing) {
    option deprecated = true;
    option idempotency_level = NO_SIDE_EFFECTS;
    option (stopcovid.common.v1.allowed_roles) = ROLE_AUDITOR;
    option (stopcovid.common.v1.allowed_roles) = ROLE_DEVICE;
  }
  // Declares no role.
  rpc Closed(WatchRequest) returns (Thing) {}
}

// A thing.
message Thing {
  // A part of a thing.
  message Part {
    // Its kind.
    Kind kind = 1;
  }
  // Kinds of part.
  enum Kind {
    // Unset.
    KIND_UNSPECIFIED = 0;
    // Old.
    KIND_OLD = 1 [deprecated = true];
  }
  // When it happened.
  google.protobuf.Timestamp time = 1;
  map<string, Part> parts = 2; // Parts by name.
  // Gone.
  string legacy = 3 [deprecated = true];
  // Maybe.
  optional int32 count = 4;
  // One way or another.
  oneof choice {
    // By name: <name> | alias.
    string name = 5;
    // From elsewhere.
    other.v1.Other other = 6;
  }
  // Below it.
  repeated Thing children = 7;
}

// What to watch.
message WatchRequest {}
"""

OTHER = """\
syntax = "proto3";

package other.v1;

// Another package's message.
message Other {}
"""


def test_api_reference_renders_links_well_known_types_oneofs_and_deprecation(
    tmp_path: Path,
) -> None:
    root = tmp_path / "protos"
    for name, text in {"sample/v1/sample.proto": SAMPLE, "other/v1/other.proto": OTHER}.items():
        (root / name).parent.mkdir(parents=True)
        (root / name).write_text(text)
    auth_proto = Path("stopcovid/common/v1/auth.proto")
    (root / auth_proto).parent.mkdir(parents=True)
    (root / auth_proto).write_text((ROOT / "protos" / auth_proto).read_text())

    sections = _sections(apiref.reference(root).markdown())

    thing = sections["sample.v1.Thing"]
    assert "| `time` | `google.protobuf.Timestamp` | 1 | When it happened. |" in thing
    assert (
        "| `parts` | map&lt;`string`, [`Thing.Part`](#sample.v1.Thing.Part)&gt; | 2 "
        "| Parts by name. |"
    ) in thing
    assert "| `legacy` | `string` | 3 | **Deprecated.** Gone. |" in thing
    assert "| `count` | optional `int32` | 4 | Maybe. |" in thing
    assert "| **oneof** `choice` |" in thing
    assert "| `name` | `string` | 5 | (oneof `choice`) By name: &lt;name&gt; \\| alias. |" in thing
    assert "| `other` | [`other.v1.Other`](#other.v1.Other) | 6 |" in thing
    assert "| `children` | repeated [`Thing`](#sample.v1.Thing) | 7 | Below it. |" in thing
    part = sections["sample.v1.Thing.Part"]
    assert "| `kind` | [`Thing.Kind`](#sample.v1.Thing.Kind) | 1 | Its kind. |" in part
    assert "| `KIND_OLD` | 1 | **Deprecated.** Old. |" in sections["sample.v1.Thing.Kind"]
    assert "other.v1.Other" in sections
    assert not any(anchor.startswith("google.") for anchor in sections)

    watch = sections["sample.v1.SampleService.Watch"]
    assert "- **Request:** stream [`WatchRequest`](#sample.v1.WatchRequest)" in watch
    assert "- **Response:** stream [`Thing`](#sample.v1.Thing)" in watch
    assert "- **Roles:** `ROLE_DEVICE`, `ROLE_AUDITOR`" in watch
    assert "- **Idempotency:** `NO_SIDE_EFFECTS`" in watch
    assert "**Deprecated.**\n\nStreams things." in watch
    closed = sections["sample.v1.SampleService.Closed"]
    assert "- **Roles:** nobody (refused to every caller)" in closed
    assert "- **Idempotency:** not declared" in closed
    # Without stopcovid.common.v1.ErrorReason in the tree there is no errors table.
    assert "errors" not in sections
