r"""The JSON Schema contracts in ``schemas/``, loaded once and compiled.

The schemas are the single source of truth for commands and result events. They are
read from the package (``worker/_schemas`` in a wheel) or, in a source checkout, from the
repository's ``schemas/`` folder.

``integer`` is narrowed to real JSON integers: JSON Schema counts ``1.0`` as an integer,
but a float must never reach a signed request as ``strategyId=1.0``.

``pattern`` follows ECMA-262, as JSON Schema says: ``$`` is the end of the string. Python's
``$`` also matches before a final newline, so ``"BTCUSDT\n"`` would pass ``^[A-Z0-9_]{1,32}$``
and reach the exchange as ``symbol=BTCUSDT%0A``. Every ``$`` outside a character class is
compiled as ``\Z`` instead.

Two validators per schema: :func:`fast_check` on the hot path (the same schema compiled by
``jsonschema-rs``, whose regexes already read ``$`` as the end of input, plus the strict
integer rule: about 1 µs a command instead of about 180), and :func:`validator`, the full
``jsonschema`` one, for the error message when the fast check refuses, and as the oracle the
tests hold the fast check to.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import orjson
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError
from jsonschema.protocols import Validator
from jsonschema.validators import extend

COMMAND_SCHEMA = "cancel-command.schema.json"
RESULT_SCHEMA = "result-event.schema.json"


def _is_strict_integer(_checker: object, instance: object) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


def ecma_anchors(pattern: str) -> str:
    """``pattern`` with each ``$`` that is an end anchor (unescaped, outside a character
    class) written as ``\\Z``, so that Python matches it where ECMA-262 does: only at the
    end of the string, never before a final newline. Everything else is kept as is."""
    out: list[str] = []
    in_class = False
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        if char == "\\" and i + 1 < n:
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            if char == "]":
                in_class = False
        elif char == "[":
            in_class = True
            # As Python reads it: a `]` first in the class (after an optional `^`) is literal.
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            out.append(pattern[i:j])
            i = j
            continue
        elif char == "$":
            out.append(r"\Z")
            i += 1
            continue
        out.append(char)
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """A schema ``pattern`` compiled with ECMA-262 end anchors (cached)."""
    return re.compile(ecma_anchors(pattern))


def _pattern(
    validator: Validator, pattern: str, instance: object, _schema: object
) -> Iterator[ValidationError]:
    # As jsonschema's own `pattern` (a search, not a match), but `$` is the end of input.
    if isinstance(instance, str) and not compile_pattern(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_type_checker = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer)
# jsonschema's `extend` is untyped; the result is a validator class like the one it extends.
StrictValidator = extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, validators={"pattern": _pattern}, type_checker=_type_checker
)


def schema_dir() -> Path:
    """Where the schema files live (packaged copy first, then the source checkout)."""
    here = Path(__file__).resolve().parents[1]  # worker/
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


def _integer_properties(schema: dict[str, Any]) -> frozenset[str]:
    """Top-level properties declared ``integer`` (directly or through a local ``$ref``)."""
    defs = schema.get("$defs", {})
    names = set()
    for name, declared in schema.get("properties", {}).items():
        ref = str(declared.get("$ref", ""))
        local = ref.startswith("#/$defs/")
        prop = defs.get(ref.removeprefix("#/$defs/"), {}) if local else declared
        kinds = prop.get("type")
        if kinds == "integer" or (isinstance(kinds, list) and "integer" in kinds):
            names.add(name)
    return frozenset(names)


@functools.cache
def fast_check(name: str) -> Callable[[object], bool]:
    """A compiled check of one schema for the hot path: True exactly when :func:`validator`
    finds nothing wrong (``tests/test_contracts.py`` holds the two to that with hypothesis).

    JSON Schema counts ``5.0`` as an integer and so does the compiled validator; the
    integer properties are narrowed to real ints here, as the full validator does. Only
    top-level properties are narrowed: it is for flat schemas such as the command's.
    """
    schema = load_schema(name)
    compiled = jsonschema_rs.validator_for(schema)
    integers = _integer_properties(schema)

    def check(instance: object) -> bool:
        if not compiled.is_valid(instance):
            return False
        if isinstance(instance, dict):
            for key in integers:
                value = instance.get(key)
                if value is not None and type(value) is not int:
                    return False
        return True

    return check
