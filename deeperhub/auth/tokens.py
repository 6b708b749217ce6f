"""Access and refresh tokens: HS256 JWTs signed with `auth.secret_key`.

Every token carries `sub` (the user id as a string), `jti`, `iat`, `nbf`, `exp`,
`iss`, `aud`, `typ` (`access` or `refresh`) and `fam`, the id of the login
(refresh token family) it descends from. Its header names the signing key with
`kid`. Verification pins the algorithm to HS256, looks the `kid` up among the
current and previous keys (`keys.KeyRing`), requires all of these claims and
turns every failure into a `TokenError`. Revocation is not checked here
because it needs the database: callers use `reads.token_revocation`.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import jwt

from ..errors import AuthError
from .keys import KeyRing, key_id, parse_previous_keys, parse_until

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..config import Settings

__all__ = [
    "ACCESS",
    "ALGORITHM",
    "MAX_TOKEN_BYTES",
    "REFRESH",
    "TokenError",
    "TokenService",
    "key_id",
]

ALGORITHM = "HS256"
ACCESS = "access"
REFRESH = "refresh"
MAX_TOKEN_BYTES = 8192

_REQUIRED_CLAIMS = ["exp", "iat", "nbf", "jti", "sub", "typ", "iss", "aud"]
_TIME_CLAIMS = ("exp", "iat", "nbf")

# Exceptions that PyJWT lets through for some malformed inputs instead of
# wrapping them in a PyJWTError (for example a header that is valid base64 but
# whose JSON nests too deeply).
_DECODE_FAILURES = (ValueError, TypeError, KeyError, OverflowError, RecursionError)


class TokenError(AuthError):
    """A token was rejected. `reason` is a short stable code such as `expired`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class TokenService:
    """Issue JWTs with the current key; verify them with the current or a previous one.

    One issuer and one audience are issued and accepted.

    `clock` returns Unix seconds and sets `iat`, `nbf` and `exp` of issued tokens.
    Verification always compares against the system clock, as PyJWT does.
    """

    def __init__(
        self, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        key = settings.secret_key
        if not key:
            raise AuthError("cannot sign tokens: auth.secret_key is empty")
        self._key = key
        self.kid = key_id(key)
        self.keys = KeyRing(
            key,
            parse_previous_keys(
                str(settings.values.get("auth.previous_keys", "")),
                env_name=str(settings.values.get("server.env", "dev")),
            ),
            parse_until(str(settings.values.get("auth.previous_keys_until", ""))),
        )
        self.issuer: str = settings["auth.issuer"]
        self.audience: str = settings["auth.audience"]
        self.access_ttl: int = settings["auth.access_ttl"]
        self.refresh_ttl: int = settings["auth.refresh_ttl"]
        self.leeway: int = settings["auth.leeway"]
        self._clock = clock

    def issue_access(
        self, user_id: int | str, family_id: str | None = None
    ) -> tuple[str, dict[str, Any]]:
        """Return a new access token for `user_id` and its claims.

        `family_id` goes into the `fam` claim, so that revoking the family of
        a login also rejects the access tokens issued with it.
        """
        extra = {"fam": family_id} if family_id is not None else None
        return self._issue(user_id, ACCESS, self.access_ttl, extra)

    def issue_refresh(
        self, user_id: int | str, family_id: str
    ) -> tuple[str, dict[str, Any]]:
        """Return a new refresh token for `user_id` in `family_id` and its claims.

        The family id is also in the `fam` claim. The DB writer stores it with
        the token's `jti` and revokes the whole family when a token is reused.
        """
        return self._issue(user_id, REFRESH, self.refresh_ttl, {"fam": family_id})

    def verify(self, token: object, expected_typ: str) -> dict[str, Any]:
        """Return the claims of `token`, or raise TokenError saying why it is invalid.

        `expected_typ` is `access` or `refresh`. A token of the other type is
        rejected, so a refresh token never works as an access token.
        """
        if not isinstance(token, str):
            raise TokenError("malformed", "token is not a string")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenError(
                "too_large",
                f"token of {len(token)} characters exceeds {MAX_TOKEN_BYTES}",
            )
        if not token.isascii():
            raise TokenError("malformed", "token contains non-ASCII characters")

        try:
            header = jwt.get_unverified_header(token)
            key = self.keys.verification_key(header.get("kid"), time.time())
            if key is None:
                raise TokenError(
                    "unknown_key", "token was signed with an unknown or retired key"
                )
            decoded = jwt.decode_complete(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": _REQUIRED_CLAIMS, "strict_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("expired", "token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("not_yet_valid", "token is not valid yet") from None
        except jwt.InvalidSignatureError:
            raise TokenError("bad_signature", "token signature is invalid") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError(
                "bad_algorithm", f"token is not signed with {ALGORITHM}"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(
                "missing_claim", f"token has no {exc.claim!r} claim"
            ) from None
        except jwt.InvalidIssuerError:
            raise TokenError("bad_issuer", "token issuer is not accepted") from None
        except jwt.InvalidAudienceError:
            raise TokenError("bad_audience", "token audience is not accepted") from None
        except jwt.PyJWTError as exc:
            raise TokenError("malformed", f"token is malformed: {exc}") from None
        except _DECODE_FAILURES:
            raise TokenError("malformed", "token is malformed") from None

        claims: dict[str, Any] = decoded["payload"]
        self._check_claim_types(claims)
        if claims["typ"] != expected_typ:
            article = "an" if expected_typ[:1] in "aeiou" else "a"
            raise TokenError(
                "wrong_type",
                f"expected {article} {expected_typ} token, got {claims['typ']!r}",
            )
        return claims

    def _issue(
        self,
        user_id: int | str,
        typ: str,
        ttl: int,
        extra: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any]]:
        now = int(self._clock())
        claims: dict[str, Any] = {
            "sub": str(user_id),
            "jti": secrets.token_urlsafe(16),
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "iss": self.issuer,
            "aud": self.audience,
            "typ": typ,
            **(extra or {}),
        }
        token = jwt.encode(
            claims, self._key, algorithm=ALGORITHM, headers={"kid": self.kid}
        )
        return token, claims

    @staticmethod
    def _check_claim_types(claims: dict[str, Any]) -> None:
        # PyJWT converts time claims with int(), so it accepts "123" and 1.5.
        # Tokens from this service always carry plain integers.
        for name in _TIME_CLAIMS:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TokenError("malformed", f"token claim {name!r} is not an integer")
        for name in ("sub", "jti", "typ"):
            value = claims[name]
            if not isinstance(value, str) or not value:
                raise TokenError("malformed", f"token claim {name!r} is not a string")
        family = claims.get("fam")
        if family is not None and (not isinstance(family, str) or not family):
            raise TokenError("malformed", "token claim 'fam' is not a string")
