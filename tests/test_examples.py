"""Every config in examples/ loads, and check-config prints it back whole."""

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from hicache_ha.cli import app
from hicache_ha.config import effective_document, parse

ROOT = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(ROOT.rglob("*.yaml"))
SECRET_DIR = "/etc/hicache-ha/secret/"


def _with_secrets(text: str, tmp_path: Path) -> str:
    """The example with its secret files made, under tmp_path (they are checked at load)."""
    for name in set(re.findall(re.escape(SECRET_DIR) + r"([\w.-]+)", text)):
        (tmp_path / name).write_text("s" * 32)
    return text.replace(SECRET_DIR, f"{tmp_path}/")


def test_every_example_is_found():
    names = {p.relative_to(ROOT).as_posix() for p in EXAMPLES}
    assert {"redis-sentinel.yaml", "file-mount.yaml", "mooncake.yaml", "3fs.yaml", "nixl.yaml",
            "seaweedfs.yaml", "aibrix.yaml", "two-node/ha.yaml"} <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_an_example_loads_and_check_config_prints_it_whole(example, tmp_path):
    text = _with_secrets(example.read_text(), tmp_path)
    cfg = parse(text, environ={})
    assert len(cfg.backends) >= 2 and cfg.admin.api_key_file is not None  # a primary, a standby, a key
    path = tmp_path / "ha.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["check-config", str(path)], env={})
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed == effective_document(cfg)
    # Every field the example wrote comes back (nothing dropped on the way), with the defaults beside it.
    for written, shown in zip(yaml.safe_load(text)["backends"], printed["backends"]):
        assert set(written) <= set(shown), f"{example.name}: {set(written) - set(shown)} dropped"
        assert shown["name"] == written["name"]
