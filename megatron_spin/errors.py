"""The error a configuration value raises, and the two checks every config record uses.

Records validate themselves at construction (``__post_init__``) and name the offending field
relative to the record (``lr``, ``sync.dtype``); whoever builds a record inside a larger one
anchors the key with :meth:`ConfigError.under`, so a user sees the full dotted key
(``actor_rollout_ref.actor.optim.lr: must be > 0``) whichever record found the problem.
"""

from __future__ import annotations

import enum
import typing
from typing import TypeVar

E = TypeVar("E", bound=enum.Enum)


class ConfigError(ValueError):
    """A configuration value breaks a rule; ``key`` is the dotted key, ``reason`` the rule."""

    def __init__(self, key: str, reason: str):
        self.key, self.reason = key, reason
        super().__init__(f"{key}: {reason}" if key else reason)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with ``prefix`` (the enclosing section) in front of its key."""
        if not prefix:
            return self
        return ConfigError(f"{prefix}.{self.key}" if self.key else prefix, self.reason)


class ClusterError(RuntimeError):
    """A call to the trainer ranks or the engines failed or timed out: the run cannot go on."""


def require(condition: bool, key: str, reason: str) -> None:
    if not condition:
        raise ConfigError(key, reason)


def enum_choices(cls: type[enum.Enum], nullable: bool = False) -> str:
    return ", ".join([str(m.value) for m in cls] + (["null"] if nullable else []))


def as_enum(cls: type[E], value, key: str, nullable: bool = False) -> E:
    """``value`` as a member of ``cls`` (config files hold the member's value)."""
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(key, f"one of {enum_choices(cls, nullable)}; got {value!r}") from None


def coerce_enums(record, **fields: type[enum.Enum]) -> None:
    """In a frozen dataclass's ``__post_init__``: turn the named string fields into enum members
    (records are built from YAML strings and from code alike); a field whose type admits None
    keeps a None, and its error lists null among the choices."""
    hints = typing.get_type_hints(type(record))
    for name, cls in fields.items():
        value = getattr(record, name)
        if value is not None:
            nullable = type(None) in typing.get_args(hints[name])
            object.__setattr__(record, name, as_enum(cls, value, name, nullable))
