"""One way to read a choice from text: every enum of the package parses the same way.

An enum declares what it is called and the spellings it also accepts::

    class Backend(ChoiceEnum, what="backend", aliases={"scaled_mm": "scaled-mm"}):
        AUTO = "auto"
        ...

``Backend.parse("Scaled_MM")`` is ``Backend.SCALED_MM``; an unknown value is a ConfigError naming the
choices; ``Backend.choices()`` is what an argparse option accepts. :class:`ChoiceStrEnum` members are
also strings (``RuntimeConfig.offload == "stages"`` holds), for fields that used to be plain strings.
No torch here: the CLI builds its options from these without importing it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar, Self, TypeVar

from sd3fp8.errors import ConfigError

E = TypeVar("E", bound=enum.Enum)


def parse_enum(cls: type[E], value: Any, what: str, aliases: Mapping[str, str] | None = None) -> E:
    """``value`` as a member of ``cls``: a member itself, its value or an alias (case and surrounding
    blanks ignored); anything else is a ConfigError naming ``what`` and the accepted values."""
    if isinstance(value, cls):
        return value
    key = str(value).strip().lower()
    key = (aliases or {}).get(key, key)
    for member in cls:
        if member.value == key:
            return member
    expected = ", ".join(str(m.value) for m in cls)
    raise ConfigError(f"unknown {what} {value!r}: expected one of {expected}")


class _Choice:
    """The parsing half of the choice enums (a plain mixin: enums allow one data type)."""

    _what: ClassVar[str] = "value"
    _aliases: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, what: str = "", aliases: Mapping[str, str] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if what:
            cls._what = what
            cls._aliases = dict(aliases or {})

    @classmethod
    def parse(cls, value: Any) -> Self:
        return parse_enum(cls, value, cls._what, cls._aliases)  # type: ignore[type-var]  # cls is an enum subclass

    @classmethod
    def choices(cls, with_aliases: bool = True) -> list[str]:
        """Every accepted spelling (values first, then aliases): an argparse option's ``choices``."""
        values = [str(m.value) for m in cls]  # type: ignore[attr-defined]  # cls is an enum subclass
        return values + [a for a in cls._aliases if a not in values] if with_aliases else values


class ChoiceEnum(_Choice, enum.Enum):
    """An enum read from text by :func:`parse_enum` (``parse``, ``choices``)."""


class ChoiceStrEnum(_Choice, enum.StrEnum):
    """A :class:`ChoiceEnum` whose members are also their string values."""
