"""The codec registry: each codec is a small frozen dataclass that parses its own string form.

A codec's string form (``"kmeans:16"``, ``"int8"``) is parsed here, at the edges (the CLI, recipes,
``MPOConfig``); the library passes codec objects (``KMeans(k=16)``). Adding a codec is one class in
one module of this package, decorated with :func:`register`: its name, parameter, validation, the
parts it writes and its encode/decode live together, and every list of codec names (the CLI's help,
the part suffixes the format reserves) is derived from the registry.

No torch at import time (``mpocompress.config`` parses codec strings before torch is needed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

#: every registered codec class by name
CODECS: dict[str, type[Codec]] = {}


@dataclass(frozen=True)
class Codec:
    """Base of all codecs. Subclasses set ``name``, ``kind`` and ``parts`` and one field at most
    (the codec's parameter, ``arg`` names it in messages)."""

    name: ClassVar[str] = ""
    #: ``"pruner"`` (decides which entries are kept) or ``"quantizer"`` (stores the values)
    kind: ClassVar[str] = ""
    #: names of the tensors (parts) this codec writes per stored tensor
    parts: ClassVar[tuple[str, ...]] = ()
    #: what the parameter is called in messages (``"K"``); empty when the codec takes none
    arg: ClassVar[str] = ""

    #: whether the quantizer stores values on a grid fixed before encoding (:meth:`grid`,
    #: :meth:`snap`, ``encode(..., grid=)``), which error-compensating quantization (GPTQ) needs
    has_grid: ClassVar[bool] = False

    @property
    def is_pruner(self) -> bool:
        return self.kind == "pruner"

    def grid(self, matrix: Any, importance: Any = None) -> Any:
        """The grid a ``(rows, cols)`` matrix is quantized on (``importance``: a weight per entry, or
        None). Only for codecs with ``has_grid``."""
        raise NotImplementedError(f"{self.name} has no fixed grid")

    def snap(self, grid: Any, column: Any) -> Any:
        """One column of the matrix (a value per row) rounded to the nearest point of ``grid``."""
        raise NotImplementedError(f"{self.name} has no fixed grid")

    @property
    def param(self) -> float | None:
        """The codec's one parameter (None when it takes none)."""
        f = fields(self)
        return getattr(self, f[0].name) if f else None

    @classmethod
    def from_arg(cls, arg: str) -> Codec:
        """The codec from the text after ``name:`` (``""`` when none was given)."""
        f = fields(cls)
        if not f:
            if arg:
                raise ValueError(f"{cls.name} takes no parameter, got {cls.name}:{arg}")
            return cls()
        if not arg:
            raise ValueError(f"{cls.name} needs a parameter: {cls.name}:{cls.arg}")
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"{cls.name} needs a number, got {arg!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{cls.name} needs a finite number, got {arg!r}")
        if f[0].type in ("int", int):
            if value != int(value):
                raise ValueError(f"{cls.name} {cls.arg} must be an integer, got {arg}")
            value = int(value)
        return cls(value)

    def __str__(self) -> str:
        p = self.param
        return self.name if p is None else f"{self.name}:{p}"

    def to_dict(self) -> dict[str, Any]:
        """The codec as JSON-ready data (its string form)."""
        return {"codec": str(self)}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator adding a codec to :data:`CODECS`."""
    if not cls.name or cls.kind not in ("pruner", "quantizer"):
        raise TypeError(f"{cls.__name__}: a codec needs a name and kind 'pruner' or 'quantizer'")
    CODECS[cls.name] = cls
    return cls


def parse_codec(text: str | Codec) -> Codec:
    """``"kmeans:16"`` -> ``KMeans(k=16)`` (a codec object is returned as it is).

    Raises:
        ValueError: an unknown name or an invalid parameter (the message says which).
    """
    if isinstance(text, Codec):
        return text
    _load_all()
    name, _, arg = str(text).strip().partition(":")
    name = name.lower()
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r} (known: {', '.join(CODECS)})")
    return CODECS[name].from_arg(arg.strip())


def codec_names(kind: str | None = None) -> tuple[str, ...]:
    """Registered codec names (of one kind: ``"pruner"`` or ``"quantizer"``)."""
    _load_all()
    return tuple(n for n, c in CODECS.items() if kind is None or c.kind == kind)


def _load_all() -> None:
    """Import the codec families so that they register (each is a small module of this package)."""
    if not CODECS:
        import importlib

        for module in ("pruning", "kmeans", "seofp", "int8", "casts"):
            importlib.import_module(f"mpocompress.codecs.{module}")
