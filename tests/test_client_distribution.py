"""stopcovid-client from the outside, as another ministry gets it.

Both wheels are built from this checkout (once per session). The client's is installed
alone into a fresh virtual environment, which then holds it and the four packages it
names and nothing else: no server package, no asyncpg, trio, Pillow, segno or rich, no
generic top-level names. mypy checks the documented examples, and a wrong caller,
against the installed wheel. Then the Ministry's flow and the scanner-device example
run from that environment, as copies outside the checkout, against real servers on
loopback and a worker process. Beside them: the version is tied to the API
(CHANGELOG.md records the API each version was built from), and the dependency floors
are those the generated code checks at import.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from stopcovid.checkin.v1 import checkin_service_pb2 as cpb

from tests.support.checkin_helpers import add_device, create_venue, enroll
from tests.support.database import Query
from tests.support.fleet import stop_gracefully, worker_process
from tests.support.servers import Servers
from tests.support.waits import wait_for

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients"
GEN = ROOT / "gen" / "stopcovid"
EXAMPLES = ROOT / "docs" / "examples"
UV = ROOT / ".cache" / "bootstrap" / "bin" / "uv"

CLIENT_REQUIRES = {"grpcio", "grpcio-status", "protobuf", "googleapis-common-protos"}
"""What stopcovid-client may depend on: what the clients and the generated code import."""
TRANSITIVE = {"typing-extensions"}
"""What those bring in turn (grpcio needs typing-extensions)."""
PROJECT_VARIABLES = {"VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT"}
SERVER_ONLY = {"stopcovid", "asyncpg", "trio", "trio-asyncio", "pillow", "segno", "rich"}

pytestmark = pytest.mark.timeout(600)


@dataclass(frozen=True)
class Wheels:
    client: Path
    server: Path


def client_version() -> str:
    version: str = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]["version"]
    return version


def run_uv(*args: str, cwd: Path) -> str:
    # Outside any project environment, so that uv acts only on what it is given.
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_VARIABLES}
    assert UV.exists(), f"{UV} is missing: run ./dev true to bootstrap"
    done = subprocess.run(
        [str(UV), *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"uv {' '.join(args)}:\n{done.stdout}{done.stderr}"
    return done.stdout


def fresh_env(path: Path, requirement: str) -> Path:
    """A new virtual environment holding `requirement` and what it depends on; its python."""
    run_uv("venv", "--quiet", "--python", sys.executable, str(path), cwd=path.parent)
    python = path / "bin" / "python"
    run_uv("pip", "install", "--quiet", "--python", str(python), requirement, cwd=path.parent)
    return python


def installed(python: Path) -> set[str]:
    listed = run_uv("pip", "list", "--python", str(python), "--format", "json", cwd=python.parent)
    return {p["name"].lower() for p in json.loads(listed)}


def client_only(tmp: Path) -> dict[str, str]:
    """The environment of a process in the client's venv: nothing of this checkout's
    (no PYTHONPATH, no STOPCOVID_* settings, a home of its own)."""
    return {"PATH": os.environ["PATH"], "HOME": str(tmp), "LANG": "C.UTF-8"}


@pytest.fixture(scope="session")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Wheels:
    out = tmp_path_factory.mktemp("wheels")
    run_uv("build", "--quiet", "--wheel", "--all-packages", "--out-dir", str(out), cwd=ROOT)
    (client,) = out.glob(f"stopcovid_client-{client_version()}-py3-none-any.whl")
    (server,) = out.glob("stopcovid-*-py3-none-any.whl")
    return Wheels(client=client, server=server)


@pytest.fixture(scope="session")
def client_python(wheels: Wheels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the client wheel alone."""
    return fresh_env(tmp_path_factory.mktemp("client") / "venv", str(wheels.client))


@pytest.fixture(scope="session")
def typing_python(wheels: Wheels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a fresh venv with the client wheel and its `typing` extra (the
    grpc and protobuf stubs), what a ministry type-checks its code against."""
    requirement = f"stopcovid-client[typing] @ {wheels.client.as_uri()}"
    return fresh_env(tmp_path_factory.mktemp("typing") / "venv", requirement)


# -- the wheels ----------------------------------------------------------------------


def test_client_wheel_is_one_namespace_with_the_generated_code_and_types(
    wheels: Wheels,
) -> None:
    names = set(zipfile.ZipFile(wheels.client).namelist())
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"stopcovid", f"stopcovid_client-{client_version()}.dist-info"}
    # A namespace: no stopcovid/__init__.py that would hide another portion.
    assert "stopcovid/__init__.py" not in names
    assert "stopcovid/client/py.typed" in names
    generated = sorted(
        p.relative_to(GEN.parent).as_posix()
        for p in GEN.rglob("*")
        if p.suffix in {".py", ".pyi"} and "__pycache__" not in p.parts
    )
    assert generated and set(generated) <= names  # messages, stubs and their .pyi
    assert {f"{p.rsplit('.', 1)[0]}.pyi" for p in generated if p.endswith("_pb2.py")} <= names
    packages = {p.name for p in GEN.iterdir() if (p / "__init__.py").is_file()}
    assert {f"stopcovid/{p}/py.typed" for p in packages} <= names
    assert not [n for n in names if n.endswith((".pyc", "hatch_build.py"))]


def test_server_wheel_depends_on_the_client_and_ships_none_of_it(wheels: Wheels) -> None:
    with zipfile.ZipFile(wheels.server) as wheel:
        names = wheel.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = re.findall(r"^Requires-Dist: (.+)$", wheel.read(metadata).decode(), re.M)
    assert {n.split("/", 1)[0] for n in names if "dist-info" not in n} == {"services", "workers"}
    assert f"stopcovid-client=={client_version()}" in requires


def test_client_installs_alone_without_the_server_stack(client_python: Path) -> None:
    got = installed(client_python)
    assert got == {"stopcovid-client", *CLIENT_REQUIRES, *TRANSITIVE}, got
    assert not got & SERVER_ONLY
    probe = (
        "import importlib.util as u, stopcovid, stopcovid.client, stopcovid.venue.v1\n"
        "print([m for m in ('services', 'workers', 'clients', 'tests') if u.find_spec(m)])\n"
        "print(list(stopcovid.__path__))\n"
    )
    done = subprocess.run(
        [str(client_python), "-c", probe],
        cwd=client_python.parent,
        env=client_only(client_python.parent),
        capture_output=True,
        text=True,
        check=True,
    )
    found, path = done.stdout.splitlines()
    assert found == "[]"  # no generic top-level names, nothing of the checkout
    assert str(ROOT) not in path and "site-packages" in path


# -- a caller, type-checked against the installed wheel ------------------------------

WRONG_CALLER = """\
from stopcovid.client import ClientConfig, NotFound, VenueClient
from stopcovid.venue.v1 import venue_service_pb2 as venue


def name_length(config: ClientConfig) -> int:
    with VenueClient(config) as client:
        made = client.rpc.CreateVenue(venue.CreateVenueRequest(venue=venue.Venue(display_name=7)))
        client.rpc.CreateVenues(venue.CreateVenueRequest())
        try:
            client.rpc.GetVenue(venue.GetVenueRequest(venue_id="x"))
        except NotFound as err:
            return len(err.reason or "")
        return made.venue.display_name
"""


def mypy(typing_python: Path, work: Path, *files: str) -> subprocess.CompletedProcess[str]:
    """This checkout's mypy, resolving imports in the other environment only (its
    site-packages: the wheel and the stubs), strict, with no configuration file."""
    (work / "mypy.ini").write_text("[mypy]\n")
    flags = ["--strict", "--no-incremental", "--config-file", "mypy.ini"]
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--python-executable", str(typing_python), *flags, *files],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )


def test_callers_type_check_against_the_installed_wheel(
    typing_python: Path, tmp_path: Path
) -> None:
    for example in ("ministry_flow.py", "scanner_device.py"):
        shutil.copy(EXAMPLES / example, tmp_path)
    (tmp_path / "wrong.py").write_text(WRONG_CALLER)
    good = mypy(typing_python, tmp_path, "ministry_flow.py", "scanner_device.py")
    assert good.returncode == 0, good.stdout + good.stderr
    bad = mypy(typing_python, tmp_path, "wrong.py")
    # The types reach the caller from the wheel: messages, the stub's RPCs, the errors.
    errors = set(re.findall(r"^wrong\.py:(\d+): error: .*\[([a-z-]+)\]$", bad.stdout, re.M))
    assert errors == {("7", "arg-type"), ("8", "attr-defined"), ("13", "return-value")}, (
        bad.stdout + bad.stderr
    )


# -- the Ministry's flow and a scanner device, from the client's environment ---------


@pytest.fixture
def worker(servers: Servers, tmp_path: Path) -> Iterator[None]:
    with worker_process(servers.settings, tmp_path / "worker.log") as proc:
        yield
        stop_gracefully(proc, timeout=20)


def phone() -> str:
    return f"+8551{secrets.randbelow(10**7):07d}"


def test_ministry_flow_and_device_example_run_from_the_client_env(
    servers: Servers, db_conn: Query, worker: None, client_python: Path, tmp_path: Path
) -> None:
    """A device scans a case and a contact at one venue through the device SDK, then the
    Ministry reports the case, gets access approved, traces and finds the contact: every
    call from the venv that holds only the client wheel."""
    device = add_device(servers, db_conn, create_venue(servers))
    case_phone = phone()
    case, contact = enroll(servers, case_phone), enroll(servers, phone())
    for example in ("ministry_flow.py", "scanner_device.py"):
        shutil.copy(EXAMPLES / example, tmp_path)

    def run(*args: str) -> str:
        done = subprocess.run(
            [str(client_python), *args],
            cwd=tmp_path,
            env=client_only(tmp_path),
            capture_output=True,
            text=True,
            timeout=150,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    common = ["--pki-dir", str(servers.pki.dir)]
    scanned = run(
        "scanner_device.py",
        *common,
        *("--checkin", servers.target("checkin"), "--device", device),
        *("--buffer", str(tmp_path / "scans.db")),
        *("--token", case.personal_token.token, "--token", contact.personal_token.token),
    )
    *answers, summary = scanned.splitlines()
    admitted = cpb.ScanOutcome.Name(cpb.SCAN_OUTCOME_ADMITTED)
    assert sorted(answers) == [f"scan 1: {admitted}", f"scan 2: {admitted}"], scanned
    assert summary.startswith("answered: 2 scans in "), scanned
    wait_for(lambda: db_conn("SELECT count(*) FROM checkins")[0][0] == 2, 60, "scans stored")
    traced = run(
        "ministry_flow.py",
        *common,
        *("--exposure", servers.target("exposure"), "--phone", case_phone, "--identify"),
        *("--timeout", "90"),
    )
    assert "TRACE_STATE_SUCCEEDED" in traced
    assert f"person {contact.person_id}" in traced
    assert case.person_id not in traced and case_phone not in traced
    assert "notifications: 1" in traced


# -- the version and the dependency floors -------------------------------------------


def api_fingerprint() -> str:
    """sha256 of the API's descriptors as the generated code embeds them: every message,
    field, enum, RPC and option, but not the comments (a comment changes no caller)."""
    digest = hashlib.sha256()
    for path in sorted(GEN.glob("*/v*/*_pb2.py")):
        name = path.relative_to(GEN.parent).with_suffix("").as_posix().replace("/", ".")
        descriptor = importlib.import_module(name).DESCRIPTOR
        digest.update(descriptor.name.encode() + b"\0" + descriptor.serialized_pb + b"\0")
    return f"sha256:{digest.hexdigest()}"


def test_client_version_is_tied_to_the_api() -> None:
    version = client_version()
    latest = re.search(
        r"^## (\S+) \(\d{4}-\d\d-\d\d\)\n\nAPI (v\d+), descriptors (sha256:[0-9a-f]{64})$",
        (CLIENT / "CHANGELOG.md").read_text(),
        re.M,
    )
    assert latest, "CHANGELOG.md: the latest entry must start with its version and API"
    logged, api, fingerprint = latest.groups()
    assert logged == version, f"CHANGELOG.md's latest entry is {logged}, the client {version}"
    majors = {m.group(1) for m in re.finditer(r"^stopcovid/\w+/(v\d+)/", _pb2_paths(), re.M)}
    assert majors == {api} and version.split(".")[0] == api.removeprefix("v")
    assert fingerprint == api_fingerprint(), (
        f"the API changed since stopcovid-client {version}: raise the minor version in "
        f"clients/pyproject.toml (and the server's pin in pyproject.toml), and add a "
        f"CHANGELOG.md entry with: API {api}, descriptors {api_fingerprint()}"
    )
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"stopcovid-client=={version}" in server


def _pb2_paths() -> str:
    return "\n".join(p.relative_to(GEN.parent).as_posix() for p in GEN.glob("*/v*/*_pb2.py"))


def floor(name: str) -> tuple[int, ...]:
    """The lower bound stopcovid-client declares for `name`."""
    for requirement in tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"][
        "dependencies"
    ]:
        found = re.fullmatch(rf"{re.escape(name)}>=([\d.]+)(,<\d+)?", requirement)
        if found:
            return tuple(int(x) for x in found.group(1).split("."))
    raise AssertionError(f"no lower bound for {name}")


def test_dependency_floors_are_what_the_generated_code_checks() -> None:
    """The generated modules refuse to import under an older protobuf or grpcio than
    the one that generated them; the declared floors must not promise less."""
    protobuf = set()
    grpc = set()
    for module in GEN.glob("*/v*/*_pb2*.py"):
        text = module.read_text()
        for m in re.finditer(r"Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", text):
            protobuf.add(tuple(int(x) for x in m.groups()))
        for m in re.finditer(r"^GRPC_GENERATED_VERSION = '([\d.]+)'", text, re.M):
            grpc.add(tuple(int(x) for x in m.group(1).split(".")))
    assert protobuf and grpc
    assert floor("protobuf") >= max(protobuf)
    assert floor("grpcio") >= max(grpc) and floor("grpcio-status") >= max(grpc)
