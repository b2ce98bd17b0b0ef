"""One shape for every registry of bnexp: a short stable name -> a plain callable.

Each component family (norms, models, samplers, eval modes, probes) keeps a ``Registry`` whose
entries all share one signature, stated in the registry's ``signature``. Saved configs name
entries by key, never by import path, so they keep working after a module moves (timm's norm map).
``get`` is the one place that turns an unknown name into a ``ConfigError`` naming the setting and
the allowed values.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, TypeVar

from bnexp.config import ConfigError

F = TypeVar("F", bound=Callable)


class Registry:
    """``setting`` is the override key whose values are this registry's names (``norm.name``)."""

    def __init__(self, setting: str, signature: str):
        self.setting, self.signature = setting, signature
        self._entries: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: ``@NORMS.register("bn")``. A name registered twice is a programming error."""
        def add(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.setting}: {name!r} is registered twice")
            self._entries[name] = fn
            return fn
        return add

    def get(self, name: str) -> Callable:
        if name not in self._entries:
            raise ConfigError(f"{self.setting}={name!r} is not an option; allowed values: "
                              f"{', '.join(self._entries)}")
        return self._entries[name]

    __getitem__ = get

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
