from hicache_ha.dataplane.layout import Layout


def test_tp_sharded_pages_get_a_key_per_rank():
    a, b = Layout(model="m", tp_rank=0, tp_size=2), Layout(model="m", tp_rank=1, tp_size=2)
    assert a.fingerprint() != b.fingerprint()
    assert a.is_storage_writer and b.is_storage_writer


def test_mla_pages_are_shared_by_the_tp_group_and_written_by_rank_0():
    a, b = Layout(model="m", tp_rank=0, tp_size=2, is_mla=True), Layout(model="m", tp_rank=1, tp_size=2, is_mla=True)
    assert a.fingerprint() == b.fingerprint()
    assert a.is_storage_writer and not b.is_storage_writer


def test_every_layout_field_separates_pages():
    base = Layout(model="m", tp_size=2, page_size=64, dtype="bfloat16", page_bytes=1 << 20)
    for change in ({"model": "n"}, {"tp_size": 4}, {"pp_rank": 1}, {"cp_rank": 1}, {"page_size": 32},
                   {"dtype": "float16"}, {"page_bytes": 1 << 19}, {"is_mla": True}, {"dp_rank": 1}):
        other = Layout(**{**base.__dict__, **change})
        assert other.fingerprint() != base.fingerprint(), change
