"""fleetlog.gateway.addresses.AddressLimit: connections per remote address."""

from __future__ import annotations

from fleetlog.gateway.addresses import AddressLimit


def test_an_address_gets_its_limit_and_no_more_until_one_is_released() -> None:
    limit = AddressLimit(2)
    assert limit.acquire("10.0.0.1") and limit.acquire("10.0.0.1")
    assert not limit.acquire("10.0.0.1"), "the third is refused"
    assert limit.count("10.0.0.1") == 2, "a refusal counts nothing"
    assert limit.acquire("10.0.0.2"), "other addresses are not affected"
    limit.release("10.0.0.1")
    assert limit.acquire("10.0.0.1")


def test_released_addresses_are_forgotten_and_none_is_never_limited() -> None:
    limit = AddressLimit(1)
    assert limit.acquire("10.0.0.1")
    limit.release("10.0.0.1")
    assert len(limit) == 0 and limit.count("10.0.0.1") == 0
    assert all(limit.acquire(None) for _ in range(5))
    limit.release(None)
    assert len(limit) == 0
