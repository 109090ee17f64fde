"""Inside SGLang, hicache-ha never waits on the host's log handlers, however slow they are."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A host process whose log handler blocks for good (a full stderr pipe), then HAStorage built by
# SGLang's factory over a member that hangs: every call times out, the member trips, the standby serves.
SCRIPT = textwrap.dedent("""
    import json, logging, threading, time
    from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory
    from hicache_ha.sim.lag import LagProbe
    from tests.sglang.conftest import DYNAMIC, storage_config
    import torch

    class Stuck(logging.Handler):  # blocks for good on hicache-ha's records (SGLang's own pass)
        def emit(self, record):
            if record.name.startswith("hicache_ha"):
                threading.Event().wait()

    logging.basicConfig(level=logging.DEBUG, handlers=[Stuck()], force=True)
    ha = {"admin": {"mode": "off"}, "deadlines_ms": {"exists": 30, "get": 60, "set": 80},
          "backends": [{"name": "g", "type": "tests.helpers:GateBackend"}, {"name": "m", "type": "memory"}]}
    s = StorageBackendFactory.create_backend("dynamic", storage_config(extra={**DYNAMIC, "ha": ha}), None)
    s.manager.members["g"].backend.close_gate()
    took, page = [], torch.ones(1024, dtype=torch.bfloat16)
    with LagProbe() as lag:
        for i in range(60):
            for call in (lambda: s.batch_exists([f"k{i}"]), lambda: s.set(f"k{i}", page),
                         lambda: s.get(f"k{i}", torch.zeros_like(page)), lambda: s.batch_get_v1([], torch.tensor([]))):
                t0 = time.perf_counter()
                call()
                took.append(time.perf_counter() - t0)
    active = s.manager.active.name
    s.manager.members["g"].backend.open_gate()
    print(json.dumps({"worst": max(took), "bound": lag.bound(0.080), "active": active}))
    import os; os._exit(0)  # the stuck handler's listener thread never returns
""")


def test_a_blocking_log_handler_in_the_host_holds_no_engine_call_and_no_failover():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["worst"] <= result["bound"], result
    assert result["active"] == "m"  # the supervisor tripped the hung member and failed over, logging all the way
