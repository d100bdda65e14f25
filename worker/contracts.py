"""The JSON Schema contracts in ``schemas/``, loaded once and compiled.

The schemas are the single source of truth for commands and result events. They are
read from the package (``worker/_schemas`` in a wheel) or, in a source checkout, from the
repository's ``schemas/`` folder.

``integer`` is narrowed to real JSON integers: JSON Schema counts ``1.0`` as an integer,
but a float must never reach a signed request as ``strategyId=1.0``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.protocols import Validator
from jsonschema.validators import extend

COMMAND_SCHEMA = "cancel-command.schema.json"
RESULT_SCHEMA = "result-event.schema.json"


def _is_strict_integer(_checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_type_checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer)
# jsonschema's `extend` is untyped; the result is a validator class like the one it extends.
StrictValidator = extend(Draft202012Validator, type_checker=_type_checker)  # type: ignore[no-untyped-call]


def schema_dir() -> Path:
    """Where the schema files live (packaged copy first, then the source checkout)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_schemas", here.parent / "schemas"):
        if (candidate / COMMAND_SCHEMA).is_file():
            return candidate
    raise FileNotFoundError("schemas not found next to the worker package")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """Parse one schema file."""
    data = orjson.loads((schema_dir() / name).read_bytes())
    if not isinstance(data, dict):
        raise TypeError(f"{name} is not a JSON object")
    return data


@functools.cache
def validator(name: str) -> Validator:
    """A compiled validator for one schema file (checked against its metaschema once)."""
    schema = load_schema(name)
    StrictValidator.check_schema(schema)
    v: Validator = StrictValidator(schema, format_checker=FormatChecker())
    return v


def command_validator() -> Validator:
    return validator(COMMAND_SCHEMA)


def result_validator() -> Validator:
    return validator(RESULT_SCHEMA)
