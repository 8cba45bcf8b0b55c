"""Prompt weights are bounded and always finite (bug 1), property-tested with Hypothesis."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusekit.prompts import MAX_WEIGHT, PromptError, apply_emphasis, parse_prompt_attention


@pytest.mark.parametrize(
    "prompt",
    ["(" * 1000 + "red" + ")" * 1000, "(red:" + "9" * 50 + ")", "(red:1000)", "(red:-101)", "(" * 49 + "red"],
)
def test_overflowing_weights_are_a_clear_error(prompt):
    with pytest.raises(PromptError, match=r"emphasis weight of .* is .*; valid: -100\.\.100"):
        parse_prompt_attention(prompt)


def test_weights_at_the_bound_are_kept_as_a1111_computes_them():
    assert parse_prompt_attention("(red:100)") == [("red", 100.0)]
    assert parse_prompt_attention("(red:-100)") == [("red", -100.0)]
    runs = parse_prompt_attention("(" * 48 + "red")  # 1.1**48 = 97.0
    assert runs == [("red", runs[0][1])] and 97 < runs[0][1] < 98
    assert parse_prompt_attention("(a BREAK b)")[1] == ("BREAK", -1.1)  # A1111's quirk, as before


def test_weights_that_cancel_the_chunk_mean_are_an_error_not_nan():
    hidden = torch.ones(1, 4, 2)
    weights = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    with pytest.raises(PromptError, match="cancel out"):
        apply_emphasis(hidden, weights)


def test_cli_reports_the_weight_error_before_loading_the_model(tmp_path, capsys):
    from diffusekit.cli import main

    out = tmp_path / "x.png"
    code = main(["generate", "(" * 1000 + "red" + ")" * 1000, "--steps", "1", "-o", str(out)])
    assert code == 2 and "emphasis weight of 'red'" in capsys.readouterr().err
    assert not out.exists()


# Emphasis syntax pieces: Hypothesis builds prompts from them (nesting, weights of any size, escapes).
PIECES = st.one_of(
    st.sampled_from(["(", ")", "[", "]", "\\(", "\\)", ":", " ", "BREAK", "a", "cat", ",", "\\"]),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(lambda w: f":{w!r})"),
    st.integers(0, 10**60).map(lambda w: f":{w})"),
    st.text(st.sampled_from("ab ().:[]"), max_size=4),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, max_size=60))
def test_weights_are_finite_and_bounded_or_a_clear_error(pieces):
    prompt = "".join(pieces)
    try:
        runs = parse_prompt_attention(prompt)
    except PromptError as e:
        assert "emphasis weight" in str(e)  # the bound, or a weight that is not a number
        return
    for text, weight in runs:
        assert math.isfinite(weight)
        assert abs(weight) <= MAX_WEIGHT or (text == "BREAK" and weight == -1.0)
        assert float(torch.tensor(weight, dtype=torch.float32)) == pytest.approx(weight, rel=1e-6, abs=1e-30)
