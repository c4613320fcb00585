"""Rate limits: per force and per unit, refused calls take nothing, one force cannot starve another."""

import asyncio

import pytest

from gateway.clock import FakeClock
from gateway.errors import ResourceExhausted
from gateway.ratelimit import Limit, RateLimitConfig, RateLimiter

FORCES = ("thames-valley", "hampshire", "surrey")
UNITS = ("serocu", "jou", "cted")


def limiter(clock: FakeClock, **kw: Limit) -> RateLimiter:
    return RateLimiter(RateLimitConfig(**kw), forces=FORCES, units=UNITS, clock=clock)  # type: ignore[arg-type]


def drain(rl: RateLimiter, force: str, units: tuple[str, ...]) -> int:
    n = 0
    while True:
        try:
            rl.take(force, units)
        except ResourceExhausted:
            return n
        n += 1


def test_force_burst_then_refused_then_refills() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(10, 5), unit=Limit(1000, 1000))
    assert drain(rl, "surrey", ("serocu",)) == 5
    with pytest.raises(ResourceExhausted, match="force surrey"):
        rl.take("surrey", ("serocu",))
    clock.advance(0.25)  # 2.5 tokens at 10/s
    assert drain(rl, "surrey", ("serocu",)) == 2


def test_a_flooding_force_does_not_starve_the_others() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(10, 10), unit=Limit(1000, 1000))
    assert drain(rl, "surrey", ("serocu",)) == 10
    for _ in range(100):  # the flood goes on, refused
        with pytest.raises(ResourceExhausted):
            rl.take("surrey", ("serocu",))
    assert drain(rl, "hampshire", ("serocu",)) == 10  # untouched by surrey's flood
    clock.advance(1.0)
    assert drain(rl, "surrey", ("serocu",)) == 10  # refused calls took nothing


def test_unit_limit_applies_per_force_and_unit() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(1000, 1000), unit=Limit(1, 3))
    assert drain(rl, "surrey", ("jou",)) == 3
    with pytest.raises(ResourceExhausted, match="unit jou of force surrey"):
        rl.take("surrey", ("jou",))
    assert drain(rl, "surrey", ("cted",)) == 3
    assert drain(rl, "hampshire", ("jou",)) == 3


def test_a_multi_unit_officer_needs_every_unit_and_takes_nothing_when_refused() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(1000, 1000), unit=Limit(1, 2))
    assert drain(rl, "surrey", ("jou",)) == 2
    with pytest.raises(ResourceExhausted):
        rl.take("surrey", ("serocu", "jou"))
    assert drain(rl, "surrey", ("serocu",)) == 2  # the refused two-unit call took nothing from serocu


def test_overrides_per_force() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(1000, 100), unit=Limit(1000, 1000), overrides={"surrey": Limit(1, 2)})
    assert drain(rl, "surrey", ("jou",)) == 2
    assert drain(rl, "hampshire", ("jou",)) == 100


def test_garbage_keys_share_one_bucket() -> None:
    clock = FakeClock()
    rl = limiter(clock, force=Limit(1e6, 1e6), unit=Limit(1e6, 1e6))
    for i in range(1000):
        rl.take(f"force-{i}", (f"unit-{i}",))
    assert len(rl) <= 2  # _unknown force and its _unknown unit


def test_stage_uses_origin_and_units() -> None:
    from gateway.pipeline import Call, Listener
    from gateway.principal import Principal
    from gateway.ratelimit import RateLimitStage

    clock = FakeClock()
    rl = limiter(clock, force=Limit(1, 1), unit=Limit(1000, 1000))
    stage = RateLimitStage(rl, own_force="thames-valley")
    call = Call(Listener.PEER, "/x.Y/Z", (), None, 0.0, 0.0)
    call.origin_force = "surrey"
    call.principal = Principal("DC-1", "surrey", ("serocu",), (), "SC")
    asyncio.run(stage(call))
    with pytest.raises(ResourceExhausted):
        asyncio.run(stage(call))


def test_a_force_holds_at_most_its_share_of_places_and_gets_them_back() -> None:
    from gateway.ratelimit import PlaceShares

    shares = PlaceShares(2, "relay links")
    with shares.hold("hampshire"), shares.hold("hampshire"):
        with (
            pytest.raises(ResourceExhausted, match="force hampshire holds 2 relay links already, its share"),
            shares.hold("hampshire"),
        ):
            pass
        with shares.hold("surrey"):  # another force's places are its own
            assert (shares.held("hampshire"), shares.held("surrey")) == (2, 1)
    assert shares.held("hampshire") == 0
    with pytest.raises(RuntimeError), shares.hold("hampshire"):
        raise RuntimeError("a channel that ends in error gives its place back too")
    assert shares.held("hampshire") == 0
    with pytest.raises(ValueError):
        PlaceShares(0, "relay links")
