"""EfficiencyConfig (issue 19): the spec syntax round-trips, every switch is off by default, bad values name the
field with expected vs got."""

from __future__ import annotations

import pytest

from internvl.efficiency import EfficiencyConfig
from internvl.errors import ConfigError


def test_spec_sets_each_switch_and_round_trips():
    cfg = EfficiencyConfig.from_spec("fastv=2:0.5,yopo_window=3,pyramid,max_visual_tokens=1024")
    assert (cfg.fastv_layer, cfg.fastv_keep, cfg.yopo_window, cfg.pyramid) == (2, 0.5, 3, True)
    assert cfg.max_visual_tokens == 1024 and cfg.yopo_drop_after is None and not cfg.is_off()
    assert cfg.fastv_on()
    full = "fastv=1:0.25,yopo_window=2,yopo_head_mask=m.json,yopo_ffn_keep=0.5,yopo_drop_after=4,schedule=s.json,"
    full += "pyramid,scale_compress=0.5,max_visual_tokens=512"
    again = EfficiencyConfig.from_spec(full)
    assert EfficiencyConfig.from_spec(again.to_spec()) == again
    assert again.yopo_head_mask == "m.json" and again.schedule == "s.json" and again.scale_compress == 0.5


def test_off_by_default():
    assert EfficiencyConfig().is_off() and EfficiencyConfig().to_spec() == "off"
    for spec in (None, "", "off", " none ", "pyramid=false"):
        assert EfficiencyConfig.from_spec(spec).is_off()
        assert EfficiencyConfig.coerce(spec) is None
    assert EfficiencyConfig.coerce({"yopo_window": 2}) == EfficiencyConfig(yopo_window=2)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fastv=2", "expected fastv=LAYER:KEEP"),
        ("fastv=x:0.5", "efficiency.fastv_layer: expected an integer, got 'x'"),
        ("foo=1", "unknown switch 'foo'"),
        ("fastv=2:1.5", "efficiency.fastv_keep: expected a number in (0, 1], got 1.5"),
        ("fastv=2:0", "efficiency.fastv_keep: expected a number in (0, 1], got 0.0"),
        ("yopo_ffn_keep=nan", "efficiency.yopo_ffn_keep: expected a number in (0, 1]"),
        ("max_visual_tokens=0", "efficiency.max_visual_tokens: expected an integer from 1"),
        ("yopo_window=0", "efficiency.yopo_window: expected an integer from 1"),
        ("fastv_keep=0.5", "needs fastv_layer"),
        ("schedule", "schedule needs a value"),
        ("pyramid=maybe", "efficiency.pyramid: expected a bare flag or true/false"),
    ],
)
def test_bad_specs_name_the_field(spec, message):
    with pytest.raises(ConfigError) as info:
        EfficiencyConfig.from_spec(spec)
    assert message in str(info.value)


def test_bad_field_values_and_types():
    with pytest.raises(ConfigError, match="efficiency.fastv_layer: expected an integer"):
        EfficiencyConfig(fastv_layer=True)
    with pytest.raises(ConfigError, match="efficiency.pyramid: expected true or false"):
        EfficiencyConfig(pyramid="yes")
    with pytest.raises(ConfigError, match="unknown fields"):
        EfficiencyConfig.coerce({"fastv": 2})
    with pytest.raises(ConfigError, match="expected an EfficiencyConfig"):
        EfficiencyConfig.coerce(3)
