"""What ships: the server wheel holds the broker and nothing of the dev tools (no benchmark, no
fake authorization server, no demo provider), which live in their own distribution (devtools/)
and reach the ``broker`` command only where that is installed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=240,
        capture_output=True,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_server_wheel_carries_no_dev_tooling(tmp_path: Path) -> None:
    names = zipfile.ZipFile(build_wheel(ROOT, tmp_path)).namelist()
    modules = [n for n in names if n.endswith(".py")]
    assert "broker/server/app.py" in modules, "the wheel holds the server"
    assert not [n for n in modules if not n.startswith("broker/")], modules
    dev = [
        n
        for n in modules
        if "bench" in n or "fakeauth" in n or "testing" in n or "devprovider" in n or "demo" in n
    ]
    assert dev == []
    assert not any("broker_devtools" in n for n in names)
    # The built-in provider catalog is data inside the package.
    assert "broker/providers/catalog.toml" in names


def test_the_dev_tools_add_their_commands_to_broker() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "bench" in done.stdout
    assert "dev-provider" in done.stdout
    serve = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "--demo-provider" in serve.stdout


def test_demo_provider_needs_dev_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "broker", "serve", "--demo-provider"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    assert "--demo-provider: only with --dev" in done.stderr
