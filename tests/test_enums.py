"""Every choice enum of the package reads text the same way (sd3fp8.enums)."""

import pytest

from sd3fp8.engine.text import TextMode
from sd3fp8.enums import ChoiceEnum, ChoiceStrEnum, parse_enum
from sd3fp8.errors import ConfigError
from sd3fp8.fp8.linear import ActivationScaling, Backend
from sd3fp8.fp8.numerics import FP8Format, Granularity
from sd3fp8.policy import Precision
from sd3fp8.runtime import ComputeDtype, Offload, RuntimeConfig

ENUMS = [Backend, ActivationScaling, FP8Format, Granularity, Precision, ComputeDtype, Offload, TextMode]


@pytest.mark.parametrize("cls", ENUMS)
def test_every_value_and_alias_parses_and_nothing_else(cls):
    for member in cls:
        assert cls.parse(member) is member and cls.parse(member.value) is member
        assert cls.parse(f"  {member.value.upper()} ") is member
    for alias, value in cls._aliases.items():
        assert cls.parse(alias) is cls(value)
    assert set(cls.choices()) == {m.value for m in cls} | set(cls._aliases)
    with pytest.raises(ConfigError, match=rf"unknown {cls._what} 'nonsense': expected one of {', '.join(cls.choices(False))}$"):
        cls.parse("nonsense")


def test_the_aliases_people_type():
    assert FP8Format.parse("float8_e4m3fn") is FP8Format.E4M3 and FP8Format.parse("fp8-e5m2") is FP8Format.E5M2
    assert Precision.parse("fp8") is Precision.FP8_E4M3 and Precision.parse("none") is Precision.OFF
    assert Backend.parse("scaled_mm") is Backend.SCALED_MM
    with pytest.raises(ConfigError):
        FP8Format.parse("e5m2fn")  # not a format


def test_string_enums_compare_as_their_strings():
    runtime = RuntimeConfig(offload="stages", dtype="float32")
    assert runtime.offload is Offload.STAGES and runtime.offload == "stages"
    assert runtime.dtype is ComputeDtype.FP32 and f"{runtime.dtype}" == "fp32"
    with pytest.raises(ConfigError, match="unknown offload mode 'disk'"):
        RuntimeConfig(offload="disk")


def test_a_new_enum_gets_parsing_by_declaring_its_name():
    class Colour(ChoiceEnum, what="colour", aliases={"grey": "gray"}):
        GRAY = "gray"

    class Shade(ChoiceStrEnum, what="shade"):
        DARK = "dark"

    assert Colour.parse("Grey") is Colour.GRAY and Shade.parse("DARK") == "dark"
    assert parse_enum(Colour, "gray", "colour") is Colour.GRAY
    with pytest.raises(ConfigError, match="unknown shade 'light'"):
        Shade.parse("light")
