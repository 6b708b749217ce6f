"""Strict JSON parsing for client input, with error messages fit for clients.

The HTTP API and the Phoenix decoder both parse JSON that clients send. Python's
`json` module differs from RFC 8259 and from client-friendly errors in three
ways, which `parse_json` corrects:

- it accepts `NaN`, `Infinity` and `-Infinity`, which are not JSON;
- an integer literal longer than `sys.get_int_max_str_digits()` (4300 digits
  by default) raises a plain ValueError whose message names interpreter
  internals;
- deep nesting raises RecursionError.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["JSONParseError", "parse_json"]


class JSONParseError(ValueError):
    """Invalid JSON text, with a message that names the cause in plain words."""


def _reject_constant(name: str) -> Any:
    raise JSONParseError(f"{name} is not valid JSON")


def parse_json(text: str) -> Any:
    """Parse `text` as strict JSON, or raise JSONParseError saying why it is invalid."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except JSONParseError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONParseError(str(exc)) from None
    except RecursionError:
        raise JSONParseError("nested too deeply") from None
    except ValueError:
        # The only other ValueError that json.loads raises for a str is the
        # integer digit limit.
        raise JSONParseError("a number has too many digits") from None
