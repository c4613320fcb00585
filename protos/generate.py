"""Generate the Python code for every .proto under protos/ into gateway/_proto/.

The generated code is committed. `python protos/generate.py --check` regenerates
into a temporary directory and exits 1 if anything differs from what is
committed (tests/test_protos_fresh.py runs it).

grpcio-tools writes absolute imports (`from psn.gateway.v1 import relay_pb2`);
they are rewritten to `gateway._proto.psn...` so that the generated modules live
inside the gateway package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "gateway" / "_proto"
_IMPORT = re.compile(r"^from psn(\.[\w.]+)? import ", re.MULTILINE)


def generate(out: Path) -> None:
    import importlib.resources

    from grpc_tools import protoc  # imported here: a development dependency only

    well_known = importlib.resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent  # mypy-protobuf's plugins live beside the interpreter
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--mypy_out={out}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = _IMPORT.sub(lambda m: f"from gateway._proto.psn{m.group(1) or ''} import ", text)
        if fixed != text:
            path.write_text(fixed)
    for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
        init = directory / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf code: do not edit (see protos/generate.py)."""\n')


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "_proto"
        generate(fresh)
        want, have = _files(fresh), _files(OUT) if OUT.exists() else set()
        stale = sorted(want ^ have)
        stale += sorted(f for f in want & have if not filecmp.cmp(fresh / f, OUT / f, shallow=False))
    if stale:
        print("generated protobuf code is stale; run `make protos`:", *stale, sep="\n  ")
        return 1
    print("generated protobuf code is up to date")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if stale")
    args = parser.parse_args()
    if args.check:
        return check()
    generate(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
