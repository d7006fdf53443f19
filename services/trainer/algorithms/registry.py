"""A name -> function table keyed by a `str` Enum, so the trainer looks algorithms up by name
instead of growing an `if loss_type == ...` ladder (verl's core_algos style).

    POLICY_LOSSES = Registry("policy loss", PolicyLossName)

    @POLICY_LOSSES.register(PolicyLossName.PPO_CLIP)
    def ppo_clip_loss(...): ...

    loss_fn = POLICY_LOSSES.get("ppo_clip")   # a plain string from a config works too
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum
from typing import Generic, TypeVar

Entry = TypeVar("Entry")


class Registry(Generic[Entry]):
    """Entries registered under the members of one `str` Enum."""

    def __init__(self, kind: str, names: type[Enum]):
        self.kind = kind
        self.names = names
        self._entries: dict[Enum, Entry] = {}

    def register(self, name: Enum) -> Callable[[Entry], Entry]:
        key = self.names(name)

        def add(entry: Entry) -> Entry:
            if key in self._entries:
                raise ValueError(f"{self.kind} {key.value!r} is registered twice")
            self._entries[key] = entry
            return entry

        return add

    def add(self, name: Enum, entry: Entry) -> Entry:
        """Registers a non-decorated entry (a class instance, a spec)."""
        return self.register(name)(entry)

    def key(self, name: str | Enum) -> Enum:
        try:
            return self.names(name)
        except ValueError:
            known = ", ".join(sorted(member.value for member in self._entries))
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def get(self, name: str | Enum) -> Entry:
        key = self.key(name)
        if key not in self._entries:
            known = ", ".join(sorted(member.value for member in self._entries))
            raise ValueError(f"{self.kind} {key.value!r} has no implementation; known: {known}")
        return self._entries[key]

    def __contains__(self, name: object) -> bool:
        try:
            return self.names(name) in self._entries
        except ValueError:
            return False

    def names_registered(self) -> list[str]:
        return [member.value for member in self._entries]
