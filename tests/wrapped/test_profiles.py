"""What hicache-ha knows per SGLang backend, as pure functions: result codes to outcomes, per-key answers
folded, extra_config checked at load."""

import pytest

from hicache_ha.backends.errors import BackendError, BackendRejected, BackendUnavailable, ConfigError
from hicache_ha.backends.wrapped.v1pages import fold, prefix
from hicache_ha.backends.wrapped.profiles import _mooncake_checked
from hicache_ha.config import parse
from hicache_ha.health.outcomes import Outcome, classify


def codes(*values):
    return _mooncake_checked("get", lambda *_: list(values))


def test_mooncake_codes_become_outcomes_where_sglang_would_see_only_false():
    assert codes(4096, -704)() == [4096, -704]  # a miss is a miss
    assert codes(0, -705)() == [0, -705]  # another writer stored it first
    for code, outcome in ((-900, Outcome.UNAVAILABLE), (-901, Outcome.UNAVAILABLE), (-200, Outcome.REJECTED),
                          (-800, Outcome.ERROR)):
        with pytest.raises(BackendError) as err:
            codes(4096, code)()
        assert classify(err.value) is outcome, code
    with pytest.raises(BackendUnavailable, match="the master did not answer"):
        codes(-200, -900)()  # the cluster not answering wins over a full segment
    with pytest.raises(BackendRejected):
        codes(-200)()


def test_per_key_answers_fold_to_one_flag_per_page_and_stop_at_the_first_miss():
    assert fold([True, True, True, False], 2) == [True, False]  # 3FS answers per K and V half
    assert fold(True, 3) == [True] * 3  # an MLA rank that does not write
    assert fold([True], 2) == [False, False]  # a short answer fails every key
    assert fold(None, 2) == [False, False]
    assert prefix([True, False, True]) == [True, False, False]


@pytest.mark.parametrize("extra,message", [
    ({"master_server_address": "nohost"}, "master_server_address must be 'host:port'"),
    ({"master_server_address": "etcd://nohost;h:1"}, "or a master cluster in HA mode"),
    ({"master_server_address": "etcd://h:1", "check_server": True}, "check_server must be false"),
    ({"global_segment_size": "4 tb"}, "global_segment_size must be bytes"),
    ({"master_server_adress": "h:1"}, "unknown key 'master_server_adress'"),
])
def test_bad_mooncake_extra_config_fails_at_load_naming_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse({"backends": [{"name": "m", "type": "sglang", "backend": "mooncake", "extra_config": extra}]})


def test_sglangs_own_keys_and_free_form_backends_pass():
    doc = parse({"backends": [
        {"name": "m", "type": "sglang", "backend": "mooncake",
         "extra_config": {"master_server_address": "10.0.0.1:50051", "global_segment_size": "4gb",
                          "prefetch_threshold": 256}},
        {"name": "n", "type": "sglang", "backend": "nixl", "extra_config": {"plugin": {"posix": {"active": True}}}},
    ]})
    assert doc.backends[0].extra_config["global_segment_size"] == "4gb"
    for ha_entry in ("etcd://10.0.0.1:2379;10.0.0.2:2379", "redis://10.0.0.1:6379"):  # masters in HA mode
        parse({"backends": [{"name": "m", "type": "sglang", "backend": "mooncake",
                             "extra_config": {"master_server_address": ha_entry}}]})
    with pytest.raises(ConfigError, match="endpoint is required"):
        parse({"backends": [{"name": "s", "type": "sglang", "backend": "seaweedfs", "extra_config": {}}]})
