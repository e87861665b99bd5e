"""The library's shared argument checks: one message shape, every bad value refused."""

import math

import pytest

from rectflow.errors import ConfigError, DataError, check_fraction, check_int, reading


@pytest.mark.parametrize("value", [1, 7, 10**12])
def test_check_int_accepts_integers_at_or_above_low(value):
    assert check_int(value, "n") == value


@pytest.mark.parametrize("value", [0, -3, True, 2.0, "3", None])
def test_check_int_refuses_with_the_name(value):
    with pytest.raises(ConfigError, match=r"^n must be an integer >= 1"):
        check_int(value, "n")


@pytest.mark.parametrize("value,expected", [(0, 0.0), (1, 1.0), (0.25, 0.25)])
def test_check_fraction_accepts_numbers_in_the_unit_interval(value, expected):
    assert check_fraction(value, "p") == expected


@pytest.mark.parametrize("value", [-1e-9, 1.0000001, math.nan, math.inf, None, "x", "0.5", True])
def test_check_fraction_refuses_with_the_name(value):
    with pytest.raises(ConfigError, match=r"^p must lie in \[0, 1\], got "):
        check_fraction(value, "p")


def test_reading_turns_any_failure_into_one_data_error_line_naming_the_file(tmp_path):
    p = tmp_path / "junk.npy"
    with pytest.raises(DataError, match=r"^.*junk\.npy: cannot read images \(ValueError: bad bytes\)$"):
        with reading(p, "images"):
            raise ValueError("bad bytes\nsecond line")


def test_reading_lets_a_data_error_through_unchanged(tmp_path):
    with pytest.raises(DataError, match=r"^own message$"):
        with reading(tmp_path / "x.npz", "images"):
            raise DataError("own message")
