"""Property tests: every value outside a flag's documented range, and every text that is not a
number, is refused by the parser with one line naming the flag; the schema coercion keeps what
it cannot read as a number for the schema to name."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusedqk import cli, plan
from fusedqk.commands import flags
from fusedqk.errors import UserError

COUNTS = [("generate", "--prompt-tokens", 1, flags.MAX_TOKENS),
          ("generate", "--max-tokens", 1, flags.MAX_TOKENS),
          ("bench", "--rounds", 1, flags.MAX_ROUNDS), ("identity", "--prompts", 1, flags.MAX_PROMPTS),
          ("generate", "--seed", 0, flags.MAX_SEED), ("blockbench", "--reps", 1, flags.MAX_REPS)]


def _refused(argv: list[str]) -> str:
    with pytest.raises(UserError) as e:
        cli.build_parser().parse_args(argv)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("command, flag, low, high", COUNTS)
@given(data=st.data())
def test_counts_outside_their_range_are_refused(command, flag, low, high, data):
    n = data.draw(st.one_of(st.integers(max_value=low - 1), st.integers(min_value=high + 1)))
    message = _refused([command, flag, str(n)])
    assert flag in message and "out of range" in message


@pytest.mark.parametrize("command, flag, low, high", COUNTS)
@given(data=st.data())
def test_counts_inside_their_range_parse_to_themselves(command, flag, low, high, data):
    n = data.draw(st.integers(min_value=low, max_value=high))
    args = cli.build_parser().parse_args([command, flag, str(n)])
    assert getattr(args, flag.lstrip("-").replace("-", "_")) == n


@given(st.text(min_size=1).filter(lambda t: not t.startswith("-")))
def test_text_that_is_not_a_finite_number_is_refused_as_temp(text):
    try:
        ok = math.isfinite(float(text)) and float(text) >= 0
    except ValueError:
        ok = False
    if ok:
        assert cli.build_parser().parse_args(["generate", "--temp", text]).temp == float(text)
    else:
        assert "--temp" in _refused(["generate", "--temp", text])


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "x": {"type": "number"},
                                           "s": {"type": "string"}}}


@given(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text())
def test_schema_coercion_turns_numeric_strings_into_numbers_only(n, x, s):
    out = plan.coerce_scalars({"n": str(n), "x": repr(x), "s": s}, SCHEMA)
    assert out["s"] == s
    assert out["x"] == x
    if abs(n) < 2**53:  # exactly representable through float parsing
        assert out["n"] == n and isinstance(out["n"], int)


@given(st.sampled_from(["nan", "inf", "-inf", "many", "", "1e", "0x10"]))
def test_schema_coercion_leaves_what_is_not_a_finite_number(text):
    assert plan.coerce_scalars({"x": text}, SCHEMA)["x"] == text
