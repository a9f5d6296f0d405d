"""`Strict`, the base class of every config object in a pipeline file (pipeline, models, stages, their parts)."""

from __future__ import annotations

import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError, ValidationError


class Strict(BaseModel):
    """Every config object refuses unknown keys: a typo is an error, never a silently ignored option.

    It also refuses true/false where a number belongs: pydantic would read `samples: true` as 1 (and YAML
    reads yes/no/on/off as booleans too), a mistake that would otherwise run."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, data: Any) -> Any:
        # A model validator, not a field one: pydantic allows no before-validator on the `kind`/`backend`
        # discriminators. The errors keep their field's location, so they still point at the line.
        if isinstance(data, dict):
            errors = [{"type": PydanticCustomError("bool_for_number", BOOLEAN_FOR_NUMBER), "loc": (name,),
                       "input": value} for name, value in data.items()
                      if name in cls.model_fields and _boolean_where_number(cls.model_fields[name].annotation, value)]
            if errors:
                raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


BOOLEAN_FOR_NUMBER = ("expected a number, got a boolean (YAML reads true/false, yes/no and on/off as booleans); "
                      "write a number, e.g. 2")


def _wants_number(annotation: Any) -> bool:
    """int or float, or an optional/union of them, but not a union that also takes bool."""
    if annotation in (int, float):
        return True
    if get_origin(annotation) is Annotated:
        return _wants_number(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        options = get_args(annotation)
        return bool not in options and any(_wants_number(option) for option in options)
    return False


def _boolean_where_number(annotation: Any, value: Any) -> bool:
    """Whether `value` puts a bool where `annotation` wants a number, directly or as an item of a
    tuple[int, int] / list[float] / dict[str, int] (nested config objects check their own fields)."""
    if isinstance(value, bool):
        return _wants_number(annotation)
    origin, args = get_origin(annotation), [a for a in get_args(annotation) if a is not Ellipsis]
    if origin in (tuple, list) and isinstance(value, (list, tuple)) and args:
        return any(isinstance(item, bool) and _wants_number(args[min(i, len(args) - 1)])
                   for i, item in enumerate(value))
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(isinstance(item, bool) and _wants_number(args[1]) for item in value.values())
    if origin in (Union, types.UnionType):  # e.g. dict[str, float] | None
        return any(_boolean_where_number(option, value) for option in args if option is not type(None))
    return False
