"""methods.py: one parser for method strings, perf rows, bench's loss options and config's --set."""

import pytest

from tokenratio.config import parse_override
from tokenratio.methods import (
    parse_loss_option,
    parse_method,
    parse_row,
    parse_value,
)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("20", 20),
        ("1e-3", 0.001),
        ("0.5", 0.5),
        ("true", True),
        ("false", False),
        ("none", None),
        ("None", None),
        ("sba", "sba"),
        ('"a b"', "a b"),
        ("[0, 1]", [0, 1]),
        ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),
    ],
)
def test_values_follow_toml_with_none_and_bare_strings(text, value):
    assert parse_value(text) == value
    assert type(parse_value(text)) is type(value)


def test_every_place_a_user_writes_key_value_reads_values_alike():
    """The disagreement the house issue measured: `none` and bare strings read one way everywhere."""
    for text, value in (("none", None), ("sba", "sba"), ("20", 20), ("false", False)):
        assert parse_override(f"loss.options.x={text}") == (["loss", "options", "x"], value)
        assert parse_loss_option(f"tdpo1.x={text}") == ("tdpo1", "x", value)
        assert parse_row(f"dpo+x={text}") == ("dpo", {"x": value})
    assert parse_method("tbpo-q[log_w_clamp=none]")[1] == {"log_w_clamp": None}


def test_methods_read_options_and_check_them():
    assert parse_method("tdpo1") == ("tdpo1", {})
    assert parse_method("tdpo1[generator=sba,clamp=20]") == (
        "tdpo1",
        {"generator": "sba", "clamp": 20},
    )
    assert parse_method("tbpo-q[center_log_w=false,log_w_clamp=none]") == (
        "tbpo-q",
        {"center_log_w": False, "log_w_clamp": None},
    )
    with pytest.raises(ValueError, match="valid options"):
        parse_method("tdpo1[generatr=sba]")
    with pytest.raises(ValueError, match="key=value"):
        parse_method("tdpo1[generator]")
    with pytest.raises(ValueError, match="valid losses"):
        parse_method("tbpo_q")
    with pytest.raises(ValueError, match=r"LOSS\[key=value"):
        parse_method("tdpo1[generator=sba")


def test_rows_and_loss_options():
    assert parse_row("dpo+prefix_sharing=false+ref_cache") == (
        "dpo",
        {"prefix_sharing": False, "ref_cache": True},
    )
    assert parse_row("tdpo1[generator=sba]") == ("tdpo1[generator=sba]", {})
    assert parse_loss_option("tbpo-a.kl_estimator=k3") == ("tbpo-a", "kl_estimator", "k3")
    with pytest.raises(ValueError, match=r"LOSS\.OPTION=VALUE"):
        parse_loss_option("kl_estimator=k3")
