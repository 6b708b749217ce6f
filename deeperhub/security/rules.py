"""The malicious payload rule set.

Rules apply to request paths and query strings (raw, then percent-decoded
up to twice to catch double encoding), to header values, and to the account
and channel fields of JSON bodies (`INSPECTED_FIELDS`). Passwords, tokens and
chat message bodies are data and are not inspected, message bodies only with
`security.inspect_message_bodies`.

Rules (docs/security.md lists the exact patterns):

- `sql_injection`: `UNION SELECT`, a quote followed by `OR`/`AND` and a
  comparison or by a comment, `OR 1=1`, `;` before `DROP`, `DELETE` and other
  statements, `SLEEP(`, `BENCHMARK(`, `WAITFOR DELAY`, system catalogs.
- `script_injection`: `<script`, `javascript:`, `vbscript:`, `data:text/html`,
  event handler attributes in a tag, `<iframe`, `<object`, `<svg` and similar.
- `path_traversal`: a `..` path segment, overlong UTF-8 dots and slashes,
  `/etc/passwd`, `/proc/self/`, `win.ini`.
- `control_bytes`: NUL, the other C0 control characters except tab, and DEL.
- `json_too_deep`: a JSON body nested deeper than `security.max_json_depth`.
- `body_too_large`: a body over `server.max_request_body` (HTTP 413).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "BODY_TOO_LARGE",
    "CONTROL_BYTES",
    "INSPECTED_FIELDS",
    "JSON_TOO_DEEP",
    "PATH_TRAVERSAL",
    "RULE_IDS",
    "SCRIPT_INJECTION",
    "SKIPPED_HEADERS",
    "SQL_INJECTION",
    "Match",
    "inspect_field",
    "inspect_headers",
    "inspect_target",
    "inspect_text",
    "json_nesting_depth",
]

SQL_INJECTION = "sql_injection"
SCRIPT_INJECTION = "script_injection"
PATH_TRAVERSAL = "path_traversal"
CONTROL_BYTES = "control_bytes"
JSON_TOO_DEEP = "json_too_deep"
BODY_TOO_LARGE = "body_too_large"
RULE_IDS = (
    SQL_INJECTION,
    SCRIPT_INJECTION,
    PATH_TRAVERSAL,
    CONTROL_BYTES,
    JSON_TOO_DEEP,
    BODY_TOO_LARGE,
)

# JSON body fields that name accounts and channels.
INSPECTED_FIELDS = ("username", "email", "login", "name")
# Headers that carry credentials or opaque values: a token may contain any
# base64 characters, and inspecting it would only risk false positives.
SKIPPED_HEADERS = frozenset(
    {"authorization", "cookie", "sec-websocket-protocol", "sec-websocket-key"}
)

_FLAGS = re.IGNORECASE

_TEXT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        SQL_INJECTION,
        re.compile(
            r"\bunion\b[\s/*+()]+(?:all[\s/*+()]+)?select\b"
            r"|['\"`]\s*\)?\s*(?:or|and|\|\||&&)\s+[\w'\"`]+\s*(?:=|<|>|like\b|is\b)"
            r"|['\"`]\s*\)?\s*(?:--|#|/\*)"
            r"|\b(?:or|and)\s+\d+\s*=\s*\d+\b"
            r"|;\s*(?:drop|delete|insert|update|alter|truncate|create|exec|shutdown)\b"
            r"|\b(?:sleep|benchmark|pg_sleep)\s*\("
            r"|\bwaitfor\s+delay\b"
            r"|\bxp_cmdshell\b"
            r"|\b(?:information_schema|sqlite_master|pg_catalog)\b",
            _FLAGS,
        ),
    ),
    (
        SCRIPT_INJECTION,
        re.compile(
            r"<\s*/?\s*script\b"
            r"|\b(?:javascript|vbscript)\s*:"
            r"|\bdata\s*:\s*text/html"
            r"|<[^>]*\bon[a-z]+\s*="
            r"|<\s*(?:iframe|object|embed|svg|math|base|meta)\b",
            _FLAGS,
        ),
    ),
    (
        PATH_TRAVERSAL,
        re.compile(
            r"(?:^|[\\/])\.\.(?:[\\/]|$)"
            r"|/etc/(?:passwd|shadow)\b"
            r"|/proc/self/"
            r"|\bwin\.ini\b",
            _FLAGS,
        ),
    ),
    (CONTROL_BYTES, re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")),
)
# All text rules in one pattern, so each text is scanned once. The named group
# that matched is the rule, and the leftmost match wins.
_ANY_RULE = re.compile(
    "|".join(f"(?P<{rule}>{pattern.pattern})" for rule, pattern in _TEXT_RULES),
    _FLAGS,
)
_CONTROL_RULE = re.compile(f"(?P<{CONTROL_BYTES}>{_TEXT_RULES[-1][1].pattern})")
# Words that a match of the SQL rule needs next to `;`, `(` or on their own.
_SQL_STATEMENTS = (
    "drop", "delete", "insert", "update", "alter", "truncate", "create", "exec",
    "shutdown",
)  # fmt: skip
_SQL_WORDS = (
    "union", "waitfor", "xp_cmdshell", "information_schema", "sqlite_master",
    "pg_catalog",
)  # fmt: skip
# Overlong UTF-8 encodings of "." and "/", seen only in raw percent-encoded text.
_OVERLONG = re.compile(r"%c0%ae|%c0%af|%e0%80%ae|%c1%9c", _FLAGS)
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


@dataclass(frozen=True)
class Match:
    """A matched rule and its location: `path`, `query`, `header:X` or `field:X`."""

    rule: str
    location: str


def inspect_text(text: str, location: str) -> Match | None:
    """Apply every text rule to `text` and return the leftmost match."""
    pattern = _ANY_RULE if _may_match(text.casefold()) else _CONTROL_RULE
    found = pattern.search(text)
    if found is None or found.lastgroup is None:
        return None
    return Match(found.lastgroup, location)


def _may_match(folded: str) -> bool:
    """Return False when no rule but `control_bytes` can match the casefolded text.

    Each test below is necessary for some alternative of the SQL, script or
    path rule, so skipping the full pattern when all fail changes no result.
    Header values such as a browser's User-Agent usually fail all of them, and
    the full pattern costs about ten times more than these tests.
    """
    if any(char in folded for char in "'\"`<"):
        return True
    if "=" in folded and ("or" in folded or "and" in folded):
        return True
    if ";" in folded and any(word in folded for word in _SQL_STATEMENTS):
        return True
    if "(" in folded and ("sleep" in folded or "benchmark" in folded):
        return True
    if ":" in folded and ("script" in folded or "data" in folded):
        return True
    if ".." in folded or "/etc/" in folded or "/proc/self/" in folded:
        return True
    if "win.ini" in folded:
        return True
    return any(word in folded for word in _SQL_WORDS)


def _decoded_forms(text: str) -> list[str]:
    """Return `text` and its percent-decoded forms, up to two rounds."""
    forms = [text]
    for _ in range(2):
        decoded = unquote(forms[-1].replace("+", " "), errors="replace")
        if decoded == forms[-1]:
            break
        forms.append(decoded)
    return forms


def inspect_target(path: str, query: str) -> Match | None:
    """Inspect a raw (still percent-encoded) request path and query string."""
    for location, raw in (("path", path), ("query", query)):
        if not raw:
            continue
        if _OVERLONG.search(raw):
            return Match(PATH_TRAVERSAL, location)
        for form in _decoded_forms(raw):
            found = inspect_text(form, location)
            if found is not None:
                return found
    return None


def inspect_headers(headers: Iterable[tuple[str, str]]) -> Match | None:
    """Inspect header values, except those in `SKIPPED_HEADERS`."""
    for name, value in headers:
        lowered = name.lower()
        if lowered in SKIPPED_HEADERS:
            continue
        found = inspect_text(value, f"header:{lowered}")
        if found is not None:
            return found
    return None


def inspect_field(name: str, value: object) -> Match | None:
    """Inspect one JSON string field. Other JSON types never match."""
    if not isinstance(value, str):
        return None
    return inspect_text(value, f"field:{name}")


def json_nesting_depth(data: bytes, limit: int) -> int:
    """Return the bracket nesting depth of a JSON text, stopping once above `limit`.

    Brackets inside strings do not count. The text need not be valid JSON:
    invalid bodies are rejected later by the JSON parser.
    """
    depth = 0
    deepest = 0
    for token in _JSON_TOKENS.finditer(data):
        char = token.group()[:1]
        if char in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif char in (b"]", b"}"):
            depth = max(0, depth - 1)
    return deepest
