"""The keys of a workflow file: where each is allowed, value checks, defaults, precedence.

Values are checked once per mapping (top level, each ``pipetask`` section, each task that
overrides something) and merged: task > label section > top level > default.
"""

from __future__ import annotations

import difflib
import math

from pilot.workflow_parse import line_of, one_line

SETTING_KEYS = ("command", "requestMemory", "requestCpus", "numberOfRetries", "retryUnlessExit",
                "memoryMultiplier", "requestMemoryMax", "timeout", "env")
TASK_KEYS = frozenset({"id", "label", "after", *SETTING_KEYS})
SECTION_KEYS = frozenset({*SETTING_KEYS, "concurrencyLimit"})
TOP_KEYS = frozenset({*SETTING_KEYS, "tasks", "pipetask"})
_ONLY_IN = {"id": "a task", "label": "a task", "after": "a task", "tasks": "the top level",
            "pipetask": "the top level", "concurrencyLimit": "a pipetask section"}

DEFAULT_MEMORY_MB = 2048
DEFAULT_CPUS = 1
RETRIES_WITH_MULTIPLIER = 5
MAX_MB = 2**40
MAX_COUNT = 2**31 - 1


class Problem(Exception):
    """A located problem in the data: ``where[key]`` (a LineDict/LineList or plain data).

    ``first`` optionally names an earlier place, e.g. the first definition of a duplicate.
    """

    def __init__(self, where, key, context: str, text: str, first=None):
        super().__init__(text)
        self.where, self.key, self.context, self.text, self.first = where, key, context, text, first

    def render(self, name: str) -> str:
        line = line_of(self.where, self.key)
        place = f"{name}:{line}" if line else name
        text = self.text
        if self.first is not None:
            where, key, label = self.first
            first_line = line_of(where, key)
            text += f" (first at line {first_line})" if first_line else f" (first at {label})"
        return one_line(f"{place}: {self.context}: {text}")


class BadValue(Exception):
    """A bad value; the caller turns it into a :class:`Problem` with its place."""


def show(value, limit: int = 40) -> str:
    """A value for an error message: short, quoted, always one line."""
    try:
        text = repr(dict(value) if isinstance(value, dict) else value)
    except (RecursionError, ValueError):  # very deep, or an int too long to print
        return "a mapping" if isinstance(value, dict) else "a list" if isinstance(value, list) \
            else "a value that cannot be shown"
    if len(text) <= limit:
        return text
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return text[:limit - 3] + "..."


def check_keys(mapping: dict, allowed: frozenset, context: str) -> None:
    """Problem for the first key of ``mapping`` not in ``allowed``."""
    for key in mapping:
        if key not in allowed:
            raise Problem(mapping, key, context, _unknown_key_text(key, allowed))


def _unknown_key_text(key, allowed) -> str:
    if key in _ONLY_IN:
        return f"key {key} is only allowed in {_ONLY_IN[key]}"
    if not isinstance(key, str):
        return f"unknown key {show(key)}: keys are names such as requestMemory"
    close = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.5)
    if not close:
        close = difflib.get_close_matches(key.lower(), [k.lower() for k in sorted(allowed)], n=1)
        close = [k for k in sorted(allowed) if close and k.lower() == close[0]]
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(sorted(allowed))})"
    return f"unknown key {show(key)}{hint}"


# ---- value checks ---------------------------------------------------------------------


def _number(key: str, value, *, integer: bool, low: float, high: float):
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadValue(f"{key} must be {kind}, got {show(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadValue(f"{key} must be a finite number, got {show(value)}")
    if integer and value != int(value):
        raise BadValue(f"{key} must be {kind}, got {show(value)}")
    if value < 0:
        raise BadValue(f"{key} must not be negative, got {show(value)}")
    if value < low:
        raise BadValue(f"{key} must be at least {low:g}, got {show(value)}")
    if value > high:
        raise BadValue(f"{key} is too large, got {show(value)} (at most {high:g})")
    return value


def _megabytes(key):
    return lambda v: int(math.ceil(_number(key, v, integer=False, low=0, high=MAX_MB)))


def _count(key, low):
    return lambda v: int(_number(key, v, integer=True, low=low, high=MAX_COUNT))


def _multiplier(value) -> float:
    # <= 1 means no scaling; stored as 1.0 so that no consumer ever shrinks a request
    value = _number("memoryMultiplier", value, integer=False, low=0, high=1e6)
    if value == 0:
        raise BadValue("memoryMultiplier must be greater than 0, got 0")
    return max(float(value), 1.0)


def _timeout(value) -> float:
    return float(_number("timeout", value, integer=False, low=0, high=1e9))


def _exit_codes(value) -> tuple:
    items = value if isinstance(value, list) else [value]
    try:
        return tuple(int(_number("retryUnlessExit", v, integer=True, low=0, high=255)) for v in items)
    except BadValue:
        raise BadValue(f"retryUnlessExit must be an exit code (0-255) or a list of them, "
                   f"got {show(value)}") from None


def _command(value):
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(_is_word(v) for v in value):
        return [v if isinstance(v, str) else str(v) for v in value]
    raise BadValue("command must be a non-empty string (run by the shell) or a non-empty list of "
               f"strings (argv), got {show(value)}")


def _is_word(value) -> bool:
    return isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _env(value) -> dict:
    if not isinstance(value, dict):
        raise BadValue(f"env must be a mapping of variable names to values, got {show(value)}")
    for name, item in value.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            raise BadValue(f"env has a bad variable name {show(name)}")
        if not (_is_word(item) or isinstance(item, bool)) or "\0" in str(item):
            raise BadValue(f"env {name} must be a string or number, got {show(item)}")
    return {name: _env_text(item) for name, item in value.items()}


def _env_text(item) -> str:
    if isinstance(item, bool):
        return "true" if item else "false"
    return item if isinstance(item, str) else str(item)


CHECKS = {
    "command": _command,
    "requestMemory": _megabytes("requestMemory"),
    "requestCpus": _count("requestCpus", 1),
    "numberOfRetries": _count("numberOfRetries", 0),
    "retryUnlessExit": _exit_codes,
    "memoryMultiplier": _multiplier,
    "requestMemoryMax": _megabytes("requestMemoryMax"),
    "timeout": _timeout,
    "env": _env,
    "concurrencyLimit": _count("concurrencyLimit", 1),
}


def read_settings(mapping: dict, context: str) -> dict:
    """The checked setting keys present in ``mapping`` (plus concurrencyLimit if any)."""
    settings = {}
    for key in mapping:
        if key not in CHECKS:
            continue
        try:
            settings[key] = CHECKS[key](mapping[key])
        except BadValue as bad:
            raise Problem(mapping, key, context, str(bad)) from None
    return settings


def merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``; env mappings merge variable by variable."""
    merged = {**base, **override}
    if "env" in base and "env" in override:
        merged["env"] = {**base["env"], **override["env"]}
    return merged


def finalize(settings: dict, where, context: str) -> tuple:
    """Defaults applied: (memory_mb, cpus, retries, multiplier, memory_max, timeout, command,
    env, retry_unless_exit); command is None when nothing gave one."""
    memory = settings.get("requestMemory", DEFAULT_MEMORY_MB)
    multiplier = settings.get("memoryMultiplier", 1.0)
    default_retries = RETRIES_WITH_MULTIPLIER if multiplier > 1 else 0
    memory_max = settings.get("requestMemoryMax", 0)
    if memory_max and memory_max < memory:
        raise Problem(where, "requestMemoryMax", context,
                      f"requestMemoryMax {memory_max} is below requestMemory {memory}")
    return (memory, settings.get("requestCpus", DEFAULT_CPUS),
            settings.get("numberOfRetries", default_retries), multiplier, memory_max,
            settings.get("timeout", 0.0), settings.get("command"), settings.get("env") or None,
            settings.get("retryUnlessExit", ()))
