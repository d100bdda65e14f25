"""``cancel-worker config``: the effective configuration, every setting with its value and
where the value came from (``default``, ``file`` for the ``--config`` TOML, ``env`` for the
``CANCEL_WORKER_*`` variable), as a table or as JSON.

Nothing secret is shown: the values of :data:`worker.settings.SECRETS` are replaced by
:data:`REDACTED` (an empty one stays empty, so an unset password shows as unset), and so is
the user information of any URL (``https://user:password@host`` → ``https://<redacted>@host``).
The values come from :func:`worker.settings.resolve_settings`, the one place that decides
which source wins.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import orjson

from worker.settings import SECRETS, Settings, env_name

REDACTED = "<redacted>"
NOT_SET = "(not set)"

# scheme://userinfo@ — greedy up to the authority's last "@", so a password holding an
# unescaped "@" is hidden whole.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]*@")

Value = str | int | float | None


def redact_url_credentials(text: str) -> str:
    """``text`` with the user information of every URL in it replaced by :data:`REDACTED`."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


@dataclass(frozen=True, slots=True)
class ConfigEntry:
    """One setting as shown: ``value`` is redacted when ``redacted``."""

    name: str
    env: str
    value: Value
    source: str
    redacted: bool


def shown_value(name: str, value: object) -> tuple[Value, bool]:
    """The value of setting ``name`` as it may be shown, and whether anything was hidden."""
    if name in SECRETS:
        return (REDACTED, True) if value else ("", False)
    if value is None or isinstance(value, int | float):
        return value, False
    text = str(value)  # a Path, or text
    hidden = redact_url_credentials(text)
    return hidden, hidden != text


def config_entries(settings: Settings, sources: Mapping[str, str]) -> list[ConfigEntry]:
    """Every setting, in the order :class:`~worker.settings.Settings` declares them."""
    entries = []
    for f in fields(settings):
        value, redacted = shown_value(f.name, getattr(settings, f.name))
        entries.append(ConfigEntry(f.name, env_name(f.name), value, sources[f.name], redacted))
    return entries


def render_text(entries: Sequence[ConfigEntry], config_file: Path | None) -> str:
    """A table: variable, value, source; a head line names the config file."""
    where = f"config file {config_file}" if config_file else "no config file"
    head = f"# {where}; the environment wins over the file, the file over the defaults"
    rows = [
        (e.env, NOT_SET if e.value is None or e.value == "" else str(e.value), e.source)
        for e in entries
    ]
    width_name = max(len(r[0]) for r in rows)
    width_value = min(60, max(len(r[1]) for r in rows))
    lines = [head]
    lines += [
        f"{name:<{width_name}}  {value:<{width_value}}  {source}".rstrip()
        for name, value, source in rows
    ]
    return "\n".join(lines)


def render_json(entries: Sequence[ConfigEntry], config_file: Path | None) -> str:
    """One JSON object: ``config_file`` and ``settings``, by name: ``value``, ``source``,
    ``env``, ``redacted``."""
    document = {
        "config_file": None if config_file is None else str(config_file),
        "settings": {
            e.name: {"value": e.value, "source": e.source, "env": e.env, "redacted": e.redacted}
            for e in entries
        },
    }
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
