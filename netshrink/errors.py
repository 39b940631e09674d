"""User-facing errors: one message naming the field and the rule, never a traceback."""

from __future__ import annotations

from pydantic import ValidationError


class UserError(Exception):
    """A mistake in the user's input. The CLI prints it and exits with code 2."""

    def __init__(self, problems: list[str] | str, title: str = "") -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1 and not self.title:
            return self.problems[0]
        lines = [self.title] if self.title else []
        return "\n".join(lines + [f"  - {problem}" for problem in self.problems])


class SearchStopped(UserError):
    """The search cannot go on and stopped cleanly: a full disk (``cause`` "disk"), a tracking server gone for longer
    than ``tracking.timeout_s`` ("tracking"). Its finished trials are kept; the message says how to resume."""

    def __init__(self, problems: list[str] | str, cause: str = "", title: str = "") -> None:
        super().__init__(problems, title)
        self.cause = cause


class DiskFull(OSError):
    """A write failed for want of space; one line naming the path (``disk_full``)."""


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server did not answer for ``tracking.timeout_s``."""


DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")


def disk_full(error: BaseException | None) -> str | None:
    """One line saying the disk is full and where, if ``error`` (or an error it was raised from) is a full disk:
    ``OSError(ENOSPC)``/``EDQUOT``, or SQLite's "database or disk is full" (through SQLAlchemy and MLflow). None otherwise."""
    import errno

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, DiskFull):
            return str(error)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {error.filename}" if error.filename else ""
            return f"the disk is full: no space left on device{where}"
        text = str(error).lower()
        for phrase in DISK_FULL_TEXT:
            if phrase in text:
                return f"the disk is full: {phrase}"
        error = error.__cause__ or error.__context__
    return None


def _location(loc: tuple) -> str:
    # pydantic appends union-branch tags such as "literal['search']" or "function-after[...]"; they mean nothing to users
    parts = [str(part) for part in loc if not (isinstance(part, str) and ("[" in part or part in {"bool", "int", "float", "str"}))]
    return ".".join(parts) if parts else "(top level)"


def describe_validation_error(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: ``field.path: rule (got value)``; union branches merged per field."""
    lines: list[str] = []
    seen: dict[str, int] = {}
    for item in error.errors():
        where = _location((prefix,) + tuple(item["loc"]) if prefix else tuple(item["loc"]))
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not allowed here; check the spelling)"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and item["type"] not in {"value_error"} and not isinstance(item["input"], (dict, list)):
            message = f"{message} (got {item['input']!r})"
        if where in seen:
            lines[seen[where]] += f"; or {message}"
            continue
        seen[where] = len(lines)
        lines.append(f"{where}: {message}")
    return lines
