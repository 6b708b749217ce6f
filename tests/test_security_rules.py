"""The malicious payload rule set (sans-I/O)."""

from __future__ import annotations

import json

import pytest

from deeperhub.security.rules import (
    CONTROL_BYTES,
    PATH_TRAVERSAL,
    SCRIPT_INJECTION,
    SQL_INJECTION,
    inspect_field,
    inspect_headers,
    inspect_target,
    inspect_text,
    json_nesting_depth,
)


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("' OR '1'='1", SQL_INJECTION),
        ("admin'--", SQL_INJECTION),
        ('x" or 1=1', SQL_INJECTION),
        ("1 UNION ALL SELECT password FROM users", SQL_INJECTION),
        ("1; DROP TABLE users", SQL_INJECTION),
        ("1 and sleep(5)", SQL_INJECTION),
        ("'; waitfor delay '0:0:5'", SQL_INJECTION),
        ("select * from sqlite_master", SQL_INJECTION),
        ("<script>alert(1)</script>", SCRIPT_INJECTION),
        ("javascript:alert(1)", SCRIPT_INJECTION),
        ('<img src=x onerror="alert(1)">', SCRIPT_INJECTION),
        ("<svg/onload=alert(1)>", SCRIPT_INJECTION),
        ("data:text/html;base64,PHNjcmlwdD4=", SCRIPT_INJECTION),
        ("../../etc/passwd", PATH_TRAVERSAL),
        ("..\\..\\windows\\win.ini", PATH_TRAVERSAL),
        ("/proc/self/environ", PATH_TRAVERSAL),
        ("name\x00.txt", CONTROL_BYTES),
        ("line\r\nInjected: header", CONTROL_BYTES),
        ("del\x7f", CONTROL_BYTES),
    ],
)
def test_text_rule_matches(text: str, rule: str) -> None:
    found = inspect_text(text, "field:x")
    assert found is not None
    assert found.rule == rule


@pytest.mark.parametrize(
    "text",
    [
        "alice",
        "o'reilly@example.com",
        "general-chat",
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)",
        "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        "en-US,en;q=0.9",
        "python-httpx/0.29.0",
        "tab\tseparated",
        "select a channel from the list",
        "1.2.3",
    ],
)
def test_benign_text_passes(text: str) -> None:
    assert inspect_text(text, "field:x") is None


@pytest.mark.parametrize(
    ("path", "query", "rule", "location"),
    [
        ("/api/%2e%2e/%2e%2e/etc/passwd", "", PATH_TRAVERSAL, "path"),
        ("/static/%252e%252e%252fsecret", "", PATH_TRAVERSAL, "path"),
        ("/files/%c0%ae%c0%ae/x", "", PATH_TRAVERSAL, "path"),
        ("/api/channels", "limit=1%27%20OR%20%271%27%3D%271", SQL_INJECTION, "query"),
        ("/api/channels", "q=%3Cscript%3E", SCRIPT_INJECTION, "query"),
        ("/api/channels", "q=a%00b", CONTROL_BYTES, "query"),
    ],
)
def test_target_rules(path: str, query: str, rule: str, location: str) -> None:
    found = inspect_target(path, query)
    assert found is not None
    assert (found.rule, found.location) == (rule, location)


def test_target_benign() -> None:
    assert inspect_target("/api/channels/12/messages", "after_id=5&limit=50") is None
    assert inspect_target("/socket/websocket", "token=eyJ.abc-_.x&vsn=2.0.0") is None


def test_headers_skip_credentials() -> None:
    headers = [
        ("Authorization", "Bearer ' OR '1'='1"),
        ("Sec-WebSocket-Protocol", "phoenix, base64url.bearer.phx.a+b/c=="),
        ("User-Agent", "curl/8.0"),
    ]
    assert inspect_headers(headers) is None
    found = inspect_headers([("User-Agent", "<script>x</script>")])
    assert found is not None
    assert found.location == "header:user-agent"


def test_field_ignores_non_strings() -> None:
    assert inspect_field("username", 5) is None
    found = inspect_field("username", "x' or 'a'='a")
    assert found is not None
    assert found.location == "field:username"


def test_json_depth_counts_nesting() -> None:
    assert json_nesting_depth(b'{"a": [1, {"b": 2}]}', 10) == 3
    assert json_nesting_depth(b'{"a": "[[[[{{{{"}', 10) == 1
    assert json_nesting_depth(b'"plain"', 10) == 0


def test_json_depth_stops_above_limit() -> None:
    deep = b"[" * 100000 + b"]" * 100000
    assert json_nesting_depth(deep, 32) == 33
    assert json.loads(b"[" * 10 + b"]" * 10) is not None


def test_prefilter_changes_no_result() -> None:
    """The cheap pre-check skips the full pattern only where it cannot match."""
    import random

    from deeperhub.security import rules

    pieces = [
        "'", '"', "`", "<", ">", "=", ";", "(", ")", ":", "..", "/", "\\", " ",
        "or", "AND", "1", "union", "SELECT", "sleep", "drop", "script", "data",
        "text/html", "/etc/passwd", "win.ini", "waitfor delay", "ſleep", "onload",
        "a", "Z", "\x00", "\n",
    ]  # fmt: skip
    generator = random.Random(7)
    for _ in range(20000):
        text = "".join(generator.choice(pieces) for _ in range(generator.randint(1, 8)))
        full = rules._ANY_RULE.search(text)
        expected = None if full is None else full.lastgroup
        found = inspect_text(text, "field:x")
        assert (found.rule if found else None) == expected, repr(text)
