"""SGLang's 3FS backend installs SIGINT/SIGTERM/SIGQUIT handlers that only close its clients: a server that
built it no longer stops on SIGTERM (and ``signal.signal`` raises outside the main thread). Built as a
hicache-ha member, its handlers are kept from the host process: SIGTERM stops the server as before.
Both are tried side by side in processes of their own, so the test shows what it guards against."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import signal, sys, time
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
from tests.sglang.conftest import build, storage_config
from tests.wrapped.conftest import engine_pool, wait_healthy

pool = engine_pool("hf3fs")
if sys.argv[1] == "sglang":
    cfg = storage_config(0, 1, extra={"use_mock_hf3fs_client": True})
    StorageBackendFactory.create_backend("hf3fs", cfg, pool)
else:
    s = build({"backends": [{"name": "primary", "type": "sglang", "backend": "hf3fs",
                             "extra_config": {"use_mock_hf3fs_client": True}}]}, tp_size=1, pool=pool)
    wait_healthy(s)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGTERM)
print("ready", flush=True)
while True:
    time.sleep(0.1)
"""


def _serve(how: str, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, how], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.strip() == "ready":
            return proc
    proc.kill()
    pytest.fail(f"{how}: the process did not get ready:\n{''.join(lines[-30:])}")


def _stops_on_sigterm(proc: subprocess.Popen, within: float = 5.0) -> bool:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(within)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False


def test_a_3fs_member_leaves_the_host_process_its_own_sigterm(hf3fs_server, tmp_path):
    import os

    env = {**os.environ, "SGLANG_HICACHE_HF3FS_CONFIG_PATH": hf3fs_server.config_file(str(tmp_path))}
    baseline = _serve("sglang", env)
    assert not _stops_on_sigterm(baseline), "SGLang's 3FS backend built directly no longer swallows SIGTERM?"
    ours = _serve("ha", env)
    assert _stops_on_sigterm(ours)
    assert ours.returncode == -signal.SIGTERM
