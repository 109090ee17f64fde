import pytest

from hicache_ha.sim.servers import RedisServer


@pytest.fixture
def redis_server():
    """A fresh redis-server on a free loopback port, killed afterwards (SIGCONT first if frozen)."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()


def _ours():
    import threading

    return {t for t in threading.enumerate() if t.name.startswith("hicache-ha") and t.is_alive()}


@pytest.fixture(autouse=True)
def _no_threads_left_behind(request):
    """A test closes what it built: threads left running (workers stuck on a frozen server, supervisors
    pinging) steal the GIL from every later test and make their timing lie."""
    import time

    before = _ours()
    yield
    deadline = time.monotonic() + 3
    while (left := _ours() - before) and time.monotonic() < deadline:
        time.sleep(0.02)
    if left:
        import sys
        import traceback

        frames = sys._current_frames()
        where = "".join(f"\n--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident])[-6:])
                        for t in sorted(left, key=lambda t: t.name)[:3] if t.ident in frames)
        pytest.fail(f"{request.node.nodeid} left {len(left)} hicache-ha threads running: "
                    f"{sorted(t.name for t in left)[:8]}{where}", pytrace=False)


@pytest.fixture(autouse=True)
def _close_sglang_storages(_no_threads_left_behind):
    """Every HAStorage a test built with tests.sglang.conftest.build is closed after it (before the
    thread check looks)."""
    import sys

    yield
    built = getattr(sys.modules.get("tests.sglang.conftest"), "_BUILT", None)
    while built:
        built.pop().close()
