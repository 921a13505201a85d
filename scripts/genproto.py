"""Regenerate broker/api from protos/ (run by `make proto`; CI checks the result is unchanged).

protoc writes absolute imports such as ``from credentialbroker.v1 import broker_pb2``; they are
rewritten to live under ``broker.api`` so the generated code needs no sys.path tricks.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "broker" / "api"
BIN = Path(sys.executable).parent
IMPORT = re.compile(r"^(from|import) credentialbroker\.", re.MULTILINE)


def main() -> int:
    target = OUT / "credentialbroker"
    if target.exists():
        shutil.rmtree(target)
    OUT.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--plugin=protoc-gen-mypy={BIN / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={BIN / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *sources,
    ]
    if protoc.main(args) != 0:
        return 1
    for path in sorted(target.rglob("*")):
        if path.is_dir():
            (path / "__init__.py").touch()
        elif path.suffix in {".py", ".pyi"}:
            text = path.read_text()
            path.write_text(IMPORT.sub(r"\1 broker.api.credentialbroker.", text))
    (target / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
