"""Who is listening: user tokens (JWT through PyJWT) and development mode.

Owns: where a token may travel (query, Bearer header, cookie), which keys and
algorithms verify it (always from configuration, never from the token, so
``alg: none`` and HS/RS confusion are refused), secret rotation, and the
reasons a stream is refused. Must not know about sockets or brokers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

import jwt

from sisyphus.protocol.http import Request
from sisyphus.protocol.names import is_valid_user_id

# RFC 7518 §3.2: an HMAC key at least as long as the hash output (32 bytes for HS256).
MIN_SECRET_LENGTH = 32


def check_secret(secret: str) -> str:
    """Return ``secret`` if long enough to sign tokens, else raise ValueError."""
    if len(secret.encode()) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"a token secret needs at least {MIN_SECRET_LENGTH} bytes "
            "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
        )
    return secret


class AuthFailure(Exception):
    """The stream can't be tied to a user; ``reason`` is a stable word for clients."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified listener: its user id, and when its token expires (epoch seconds)."""

    user_id: str
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One key that may verify tokens, the algorithms allowed with it, and until when."""

    key: str
    algorithms: tuple[str, ...]
    valid_until: float | None = None


class TokenVerifier:
    """Verifies user tokens against configured keys; ``now`` is injectable for tests."""

    def __init__(
        self,
        keys: list[VerificationKey],
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 10.0,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._audience = audience
        self._issuer = issuer
        self._leeway = leeway
        self._now = now

    def verify(self, token: str) -> Identity:
        """The identity a token proves, or :class:`AuthFailure` saying why not."""
        required = ["exp", "sub"]
        required += ["aud"] if self._audience else []
        required += ["iss"] if self._issuer else []
        now = self._now()
        last_failure = "invalid_token"
        for key in self._keys:
            if key.valid_until is not None and now >= key.valid_until:
                continue  # a rotated-out secret
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=list(key.algorithms),
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"require": required},
                )
            except jwt.ExpiredSignatureError:
                raise AuthFailure("expired") from None
            except jwt.ImmatureSignatureError:
                raise AuthFailure("not_yet_valid") from None
            except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError, jwt.InvalidKeyError):
                continue  # maybe another configured key signed it
            except jwt.InvalidTokenError:
                last_failure = "invalid_token"
                continue
            subject = claims.get("sub")
            if not isinstance(subject, str) or not is_valid_user_id(subject):
                raise AuthFailure("invalid_user")
            expires = claims.get("exp")
            return Identity(subject, float(expires) if isinstance(expires, int | float) else None)
        raise AuthFailure(last_failure)


def mint_token(
    secret: str,
    user_id: str,
    ttl: float = 3600.0,
    algorithm: str = "HS256",
    audience: str | None = None,
    issuer: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token for ``user_id`` that expires after ``ttl`` seconds."""
    if not is_valid_user_id(user_id):
        raise ValueError(f"invalid user id {user_id[:80]!r}")
    if ttl <= 0:
        raise ValueError("ttl must be > 0")
    check_secret(secret)
    issued = time.time() if now is None else now
    claims: dict[str, object] = {"sub": user_id, "iat": int(issued), "exp": int(issued + ttl)}
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm)


def token_from(request: Request, cookie_name: str) -> str | None:
    """The token a request carries: ``token`` query parameter, Bearer header, or cookie."""
    token = request.query_value("token")
    if token:
        return token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    cookies = request.headers.get("cookie")
    if cookies:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookies)
        except CookieError:
            return None
        morsel = jar.get(cookie_name)
        if morsel is not None and morsel.value:
            return morsel.value
    return None


class Authenticator:
    """Turns a ``GET /`` request into an :class:`Identity`.

    With a verifier, only a valid token identifies; a bare ``?user=`` is refused.
    Without one (development mode), ``?user=`` is trusted as it comes.
    """

    def __init__(self, verifier: TokenVerifier | None, cookie_name: str) -> None:
        self._verifier = verifier
        self._cookie_name = cookie_name

    @property
    def development_mode(self) -> bool:
        return self._verifier is None

    def identify(self, request: Request) -> Identity:
        claimed = request.query_value("user")
        if self._verifier is None:
            if not claimed or not is_valid_user_id(claimed):
                raise AuthFailure("invalid_user")
            return Identity(claimed, None)
        token = token_from(request, self._cookie_name)
        if token is None:
            raise AuthFailure("missing_token")
        identity = self._verifier.verify(token)
        if claimed is not None and claimed != identity.user_id:
            # A token of user A never opens user B's stream, whatever the query says.
            raise AuthFailure("user_mismatch")
        return identity
