import pytest
import redis as redislib

from hicache_ha.backends.base import BackendContext
from hicache_ha.backends.errors import BackendRejected, BackendUnavailable
from hicache_ha.backends.redis_backend import RedisBackend, redact
from hicache_ha.config import parse
from hicache_ha.sim.servers import RedisServer, free_port


def make(url, **extra):
    cfg = parse({"backends": [{"name": "r", "type": "redis", "url": url, **extra}]}, environ={}).backends[0]
    return RedisBackend.from_config(cfg, BackendContext())


def test_refused_connection_is_unavailable():
    b = make(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(BackendUnavailable):
        b.get(["k"])


def test_out_of_memory_is_rejected():
    with RedisServer(extra_args=("--maxmemory", "1mb", "--maxmemory-policy", "noeviction")) as server:
        b = make(server.url)
        with pytest.raises(BackendRejected, match="out of memory"):
            b.set([f"k{i}" for i in range(64)], [b"x" * 65536] * 64)


def test_a_read_only_replica_is_unavailable(redis_server):
    with RedisServer() as replica:
        redislib.Redis(port=replica.port).replicaof("127.0.0.1", redis_server.port)
        b = make(replica.url)
        with pytest.raises(BackendUnavailable, match="READONLY|read only"):
            b.set(["k"], [b"v"])


def test_ttl_expires_pages(redis_server):
    b = make(redis_server.url, ttl_s=1)
    b.set(["k"], [b"v"])
    ttl = redislib.Redis(port=redis_server.port).pttl("k")
    assert 0 < ttl <= 1000


def test_passwords_never_appear_in_descriptions():
    assert redact("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact("redis://user:s3cret@h:1/0") == "redis://user:***@h:1/0"
    b = make("redis://:s3cret@127.0.0.1:1/0")
    assert "s3cret" not in str(b.describe())


def test_password_file_is_used(redis_server, tmp_path):
    redislib.Redis(port=redis_server.port).config_set("requirepass", "pw-from-file")
    (tmp_path / "pw").write_text("pw-from-file\n")
    b = make(redis_server.url, password_file=str(tmp_path / "pw"))
    b.set(["k"], [b"v"])
    assert bytes(b.get(["k"])[0]) == b"v"
