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
