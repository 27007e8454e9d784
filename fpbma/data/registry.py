"""One registry of the datasets that fpbma builds itself, by the name ``fpbma.data.load`` accepts.

Two kinds of entry:

* ``"offline"``: a clean dataset built without network (``builders.py``: ``mnist``, ``digits``,
  ``fashion_mnist``). ``factory(data_dir=..., file_format=..., **builder_kwargs)`` returns its TFDS
  builder.
* ``"shifted"``: the corrupted test sets ``<base>_corrupted`` of a registered offline ``base``
  (``shifted.py``). ``factory(config="<corruption>_<severity>", data_dir=..., file_format=...)`` returns
  the builder of one corruption × severity.

The modules that define builders register them here at import; ``sources.py`` resolves names only
through this registry. This module imports nothing else of ``fpbma.data``, so every other module may
import it.

>>> import fpbma.data
>>> from fpbma.data import registry
>>> registry.names("offline")
('mnist', 'digits', 'fashion_mnist')
>>> registry.get("digits_corrupted").base
'digits'
>>> r = registry.Registry()                       # an empty registry of its own
>>> _ = r.register("toy", lambda **kw: None)
>>> r.names(), r.get("toy").kind
(('toy',), 'offline')
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

KINDS = ("offline", "shifted")


class RegistryError(ValueError):
    """An unknown or duplicate dataset name, or an inconsistent registration."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One registered dataset.

    Attributes:
      name: the name given to ``fpbma.data.load`` (``"digits"``, ``"digits_corrupted"``).
      factory: callable returning the (possibly unprepared) TFDS builder; see the module docstring
        for the keyword arguments of each kind.
      kind: ``"offline"`` or ``"shifted"``.
      base: for ``"shifted"``, the offline dataset whose test split is corrupted; None otherwise.
    """

    name: str
    factory: Callable[..., Any]
    kind: str
    base: str | None


class Registry:
    """Dataset name → ``Entry``, in registration order."""

    def __init__(self):
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, builder_factory: Callable[..., Any], *, kind: str = "offline",
                 base: str | None = None) -> Entry:
        """Adds ``name``; raises ``RegistryError`` for a taken name or an inconsistent kind/base.

        Args:
          name: the dataset name (no ``/``).
          builder_factory: callable returning the TFDS builder (usually the builder class).
          kind: ``"offline"`` (clean, ``base`` must be None) or ``"shifted"`` (corrupted test sets of the
            already registered offline dataset ``base``).
          base: see ``kind``.

        Returns:
          The new ``Entry``.
        """
        if not isinstance(name, str) or not name or "/" in name:
            raise RegistryError(f"Dataset name must be a non-empty string without '/'; got {name!r}.")
        if name in self._entries:
            raise RegistryError(
                f"Dataset {name!r} is already registered (as {self._entries[name].kind}); pick another name.")
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {KINDS}; got {kind!r}.")
        if not callable(builder_factory):
            raise RegistryError(f"builder_factory of {name!r} must be callable; got {builder_factory!r}.")
        if kind == "offline" and base is not None:
            raise RegistryError(f"Offline dataset {name!r} takes no base; pass base only with kind='shifted'.")
        if kind == "shifted" and (base not in self._entries or self._entries[base].kind != "offline"):
            raise RegistryError(
                f"Shifted dataset {name!r} needs base= a registered offline dataset "
                f"({', '.join(self.names('offline'))}); got {base!r}. Register the base first.")
        entry = Entry(name, builder_factory, kind, base)
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> Entry:
        """The entry of ``name``; raises ``RegistryError`` listing the registered names if unknown."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RegistryError(
                f"Unknown registered dataset {name!r}; registered: {', '.join(self._entries) or 'none'}.") from None

    def names(self, kind: str | None = None) -> tuple[str, ...]:
        """Registered names of one ``kind`` (all kinds when None), in registration order."""
        if kind is not None and kind not in KINDS:
            raise RegistryError(f"kind must be None or one of {KINDS}; got {kind!r}.")
        return tuple(n for n, e in self._entries.items() if kind is None or e.kind == kind)

    def __contains__(self, name: object) -> bool:
        return name in self._entries


REGISTRY = Registry()
"""The registry ``fpbma.data.load`` resolves names through."""

register = REGISTRY.register
get = REGISTRY.get
names = REGISTRY.names


def prepare_builder(builder) -> None:
    """Prepares an offline or shifted builder once: its ``check_source()`` first (if any), then TFDS."""
    if builder.is_prepared():
        return
    if hasattr(builder, "check_source"):
        builder.check_source()  # fail with the install hint before TFDS writes anything
    builder.download_and_prepare()
