"""The wheel, as a user gets it: built from this tree, installed with its dependencies in a clean venv
(no test stack, no SGLang), and its command tried there."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from hicache_ha import __version__

ROOT = Path(__file__).resolve().parents[1]


def run(*args, **kwargs):
    out = subprocess.run(list(map(str, args)), capture_output=True, text=True, timeout=600, **kwargs)
    assert out.returncode == 0, f"{args}: {out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, the venv's hicache-ha command)."""
    tmp = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", tmp / "dist", ROOT)
    (wheel,) = (tmp / "dist").glob("hicache_ha-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", wheel)
    return wheel, venv / "bin" / "hicache-ha"


def test_the_wheel_carries_its_license_and_metadata_and_no_tests(installed):
    wheel, _ = installed
    assert wheel.name.startswith(f"hicache_ha-{__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert "License-Expression: Apache-2.0" in meta and "Classifier: " in meta and "Project-URL: " in meta
    assert "Provides-Extra: sglang" in meta
    assert not any(line.startswith("Requires-Dist: torch") for line in meta.splitlines())


def test_version_and_every_help_work_in_the_clean_venv(installed):
    _, cli = installed
    assert run(cli, "--version").stdout.strip() == f"hicache-ha {__version__}"
    top = run(cli, "--help").stdout
    commands = ["alert-rules", "check-config", "demo", "status", "switch", "attach", "detach", "events",
                "remove", "controller", "version"]
    for command in commands:
        assert command in top
        out = run(cli, command, "--help").stdout
        assert "Usage:" in out and "Traceback" not in out


def test_check_config_round_trips_a_full_config(installed, tmp_path):
    """The printed document is a valid config that prints the same again."""
    _, cli = installed
    key = tmp_path / "admin.key"
    key.write_text("k" * 32)
    source = tmp_path / "ha.yaml"
    source.write_text(f"""
backends:
  - {{name: primary, type: valkey, sentinel: {{master: m, addresses: ["10.0.0.1:26379"]}}, max_concurrent: 8}}
  - {{name: shared, type: file, path: {tmp_path}/pages, capacity_bytes: 1GiB}}
  - {{name: mooncake, type: sglang, backend: mooncake, extra_config: {{protocol: tcp}}}}
deadlines_ms: {{get: 400}}
admin: {{mode: remote, deployment: prod-1, api_key_file: {key}, expected_ranks: 4}}
failover: {{failback: auto}}
observe: {{webhooks: [{{url: "https://hooks.example/x"}}]}}
""")
    first = run(cli, "check-config", source, env={"PATH": "/usr/bin:/bin"}).stdout
    again = tmp_path / "again.json"
    again.write_text(first)
    second = run(cli, "check-config", again, env={"PATH": "/usr/bin:/bin"}).stdout
    assert json.loads(first) == json.loads(second)
    doc = json.loads(first)
    assert doc["backends"][1]["capacity_bytes"] == 2**30 and doc["deadlines_ms"]["get"] == 400
    assert doc["admin"]["deployment"] == "prod-1" and doc["observe"]["webhooks"][0]["timeout_ms"] == 2000
