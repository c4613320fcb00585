"""The committed generated protobuf code matches protos/ (a stale copy fails here)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_detects_a_stale_file(tmp_path: Path) -> None:
    # The check itself must be able to fail: copy the tree, edit a proto, check.
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", copy / "protos")
    shutil.copytree(ROOT / "gateway" / "_proto", copy / "gateway" / "_proto")
    proto = copy / "protos" / "psn" / "demo" / "intel" / "v1" / "intel.proto"
    proto.write_text(proto.read_text().replace("uint32 max_results = 2;", "uint32 max_results = 2;\n  bool fuzzy = 3;"))
    result = subprocess.run(
        [sys.executable, str(copy / "protos" / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert "intel_pb2.py" in result.stdout
