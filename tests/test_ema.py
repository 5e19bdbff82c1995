"""InPlaceEMA: the same averages as diffusers' EMAModel (to float round-off) and the same state format."""
import pytest
import torch
from diffusers.training_utils import EMAModel

from flowlab.train.ema import InPlaceEMA


def _params(seed: int, frozen: bool = False) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in [(7, 5), (5,), (3, 4, 2)]]
    if frozen:
        ps[1].requires_grad_(False)
    return ps


def _drift(params: list[torch.nn.Parameter], g: torch.Generator) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


SETTINGS = {
    "trainer": {"decay": 0.999},  # what flowlab's trainer uses: (1 + n) / (10 + n) capped at train.ema_decay
    "low_cap": {"decay": 0.5},  # the cap reached after 8 steps
    "warmup": {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 2 / 3},
    "delayed": {"decay": 0.99, "update_after_step": 3, "min_decay": 0.2},
}


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trained", "one-frozen"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_in_place_ema_matches_diffusers(name, frozen):
    params = _params(0, frozen)
    ref, ours = EMAModel(params, foreach=True, **SETTINGS[name]), InPlaceEMA(params, **SETTINGS[name])
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        _drift(params, g)
        ref.step(params)
        ours.step(params)
        assert ours.optimization_step == ref.optimization_step and ours.cur_decay_value == ref.cur_decay_value
        for a, b in zip(ours.shadow_params, ref.shadow_params):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # not the initial values: the averages moved with the parameters
    assert not torch.equal(ours.shadow_params[0], _params(0)[0])
    if frozen:  # a frozen parameter is copied, not averaged
        assert torch.equal(ours.shadow_params[1], params[1])


def test_decay_schedule_is_diffusers():
    """The first step copies the parameters (decay 0); then ``(1 + n) / (10 + n)`` up to the cap."""
    params = _params(0)
    ema = InPlaceEMA(params, decay=0.5)
    g = torch.Generator().manual_seed(2)
    decays = []
    for _ in range(10):
        _drift(params, g)
        ema.step(params)
        decays.append(ema.cur_decay_value)
        if len(decays) == 1:
            assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, params))
    expected = [0.0] + [min((1 + n) / (10 + n), 0.5) for n in range(1, 10)]
    assert decays == pytest.approx(expected, abs=0)


def test_state_dict_round_trips_both_ways():
    params = _params(0)
    ours, ref = InPlaceEMA(params, decay=0.9), EMAModel(params, decay=0.9, foreach=True)
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        _drift(params, g)
        ours.step(params)
    state = ours.state_dict()
    assert state.keys() == ref.state_dict().keys()
    ref.load_state_dict(state)  # a checkpoint written by flowlab loads into diffusers' class ...
    back = InPlaceEMA(_params(5), decay=0.9)
    back.load_state_dict(ref.state_dict())  # ... and back
    assert back.optimization_step == 4
    for a, b in zip(back.shadow_params, ours.shadow_params):
        assert torch.equal(a, b)


def test_wrong_number_of_parameters_is_refused():
    ema = InPlaceEMA(_params(0), decay=0.9)
    with pytest.raises(ValueError, match="got 2 parameters, the EMA follows 3"):
        ema.step(_params(0)[:2])
