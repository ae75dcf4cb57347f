"""Strict pydantic schemas and one reading of pydantic's validation errors.

Policy: every file omniquant validates with pydantic (recipes, engine LLM API options,
manifest lines, task lines) forbids unknown fields, and each of them turns a
``ValidationError`` into its own message. The wording stays per file kind on purpose:
a recipe speaks of *fields* and of ``--set`` items, the engine options speak of *keys*
as TensorRT-LLM's LLM API reference does, a manifest names the line. What is shared is
here: the strict base models and the reading of pydantic's error dictionaries (where a
problem is, which kind it is, which fields are allowed there), which each of the three
did on its own before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError


class Strict(BaseModel):
    """A schema section: unknown fields are errors (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid")


class StrictTyped(Strict):
    """A strict section that also refuses type coercion (``"1"`` is not an int)."""

    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class FieldProblem:
    """One problem of a validation error, read from pydantic's error dictionary.

    Attributes:
        loc: Where, as pydantic gives it (field names and list indices).
        kind: ``unknown`` (a field the schema does not have), ``missing`` (a required one
            absent) or ``value`` (present with a bad value, or a check across fields).
        message: pydantic's message without its ``"Value error, "`` prefix.
        input: The value at fault (for ``value`` problems).
    """

    loc: tuple
    kind: Literal["unknown", "missing", "value"]
    message: str
    input: Any = None

    @property
    def where(self) -> str:
        """``loc`` as a dotted path (``""`` at the top level)."""
        return ".".join(str(p) for p in self.loc)


def field_problems(exc: ValidationError) -> list[FieldProblem]:
    """The problems of ``exc`` in pydantic's order."""
    kinds = {"extra_forbidden": "unknown", "missing": "missing"}
    return [
        FieldProblem(
            loc=tuple(err["loc"]),
            kind=kinds.get(err["type"], "value"),
            message=err["msg"].removeprefix("Value error, "),
            input=err.get("input"),
        )
        for err in exc.errors()
    ]


def allowed_fields(model: type[BaseModel], parent: tuple) -> list[str]:
    """Field names the schema allows at ``parent`` (a ``loc`` without its last part), in
    declaration order; ``[]`` when ``parent`` does not lead to a section.

    List indices are skipped and a section typed ``X | None`` or ``list[X]`` leads to ``X``.
    """
    for part in parent:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        ann = field.annotation
        candidates = [ann, *(getattr(ann, "__args__", None) or ())]
        nxt = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if nxt is None:
            return []
        model = nxt
    return list(model.model_fields)
