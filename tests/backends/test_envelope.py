import pytest

from hicache_ha.backends.envelope import HEADER_SIZE, open_page, seal
from hicache_ha.backends.errors import CorruptPage


def stored(key: str, payload: bytes) -> bytes:
    return seal(key, payload) + payload


def test_round_trip_returns_the_payload():
    payload = bytes(range(256)) * 16
    assert bytes(open_page("k", stored("k", payload))) == payload


def test_a_flipped_byte_is_corrupt():
    blob = bytearray(stored("k", b"x" * 4096))
    blob[HEADER_SIZE + 100] ^= 1
    with pytest.raises(CorruptPage, match="checksum"):
        open_page("k", bytes(blob))


def test_a_page_filed_under_another_key_is_corrupt():
    with pytest.raises(CorruptPage):
        open_page("other", stored("k", b"x" * 100))


@pytest.mark.parametrize("cut", [1, HEADER_SIZE, HEADER_SIZE + 10])
def test_a_truncated_page_is_corrupt(cut):
    blob = stored("k", b"y" * 64)
    with pytest.raises(CorruptPage):
        open_page("k", blob[:-cut] if cut < len(blob) else b"")


def test_foreign_bytes_are_corrupt():
    with pytest.raises(CorruptPage, match="not written by hicache-ha"):
        open_page("k", b"\0" * 64)
