"""One engine rank in its own process: HAStorage built by SGLang's real StorageBackendFactory, with
simulated HiCache traffic through SGLang's batch API. Reports what the engine saw to a JSON file.

    RANK_SPEC='{"rank": 0, "tp_size": 4, "ha": {...}, "out": "/tmp/r0.json"}' python -m tests.control.rank_proc
"""

import json
import os
import signal
import threading
import time

import torch
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

from hicache_ha.sim.engine import Simulation
from hicache_ha.sim.workload import Workload
from tests.sglang.conftest import DYNAMIC, storage_config


class HAStorageRank:
    """The simulator's storage interface on top of HAStorage's SGLang methods (tensors in and out)."""

    def __init__(self, storage):
        self.s = storage

    def exists(self, keys):
        return self.s.batch_exists(keys)

    def get(self, keys, nbytes=None):
        got = self.s.batch_get(keys, [torch.empty(nbytes, dtype=torch.uint8) for _ in keys])
        return [None if t is None else t.numpy() for t in got]

    def set(self, keys, values):
        ok = self.s.batch_set(keys, [torch.frombuffer(bytearray(v), dtype=torch.uint8) for v in values])
        return [ok] * len(keys)


def main():
    spec = json.loads(os.environ["RANK_SPEC"])
    cfg = storage_config(spec["rank"], spec["tp_size"], extra={**DYNAMIC, "ha": spec["ha"]}, model="mp/model")
    storage = StorageBackendFactory.create_backend("dynamic", cfg, None)
    sim = Simulation([HAStorageRank(storage)], page_size=16 * 1024,
                     workload=Workload(conversations=8, seed=spec["rank"], turn_pages=(4, 16), max_pages=128)).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    def report():
        st, m = sim.stats, storage.manager
        agent = storage.control.agent
        data = {"calls": len(st.samples), "errors": st.errors_surfaced, "bad_pages": st.verify_failures,
                "max_latency_s": max((s.seconds for s in list(st.samples)), default=0.0),
                "epoch": m.epoch, "active": m.active.name if m.active else None, "failovers": m.failovers,
                "in_flight": {name: member.in_flight for name, member in m.members.items()},
                "members": sorted(m.members), "prepared": len(agent._prepared) if agent else None,
                "threads": sum(1 for t in threading.enumerate() if t.name.startswith("hicache-ha")),
                "time": time.time()}
        tmp = spec["out"] + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, spec["out"])

    while not stop.wait(0.2):
        report()
    sim.finish()
    report()
    storage.close()


if __name__ == "__main__":
    main()
