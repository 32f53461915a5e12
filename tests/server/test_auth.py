"""Who may listen: user tokens, development mode, expiry, and what never reaches the logs."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from sisyphus.client import mint_token
from sisyphus.server.app import Service
from tests.conftest import ServiceFactory, grant
from tests.support.sse_client import SseClient, status

SECRET = "a-test-secret-that-is-long-enough-for-hs512-0123456789abcdefghij"
OTHER = "another-secret-that-is-also-long-enough-for-hs512-98765zyxwvutsr"


@pytest.fixture
def broker_kind() -> str:
    """Authentication doesn't depend on the broker: these run on the embedded one."""
    return "embedded"


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"sub": "1", "iat": now, "exp": now + 600}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def pem_pair(private: Any) -> tuple[bytes, str]:
    private_pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem.decode()


RSA_PRIVATE, RSA_PUBLIC = pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
EC_PRIVATE, EC_PUBLIC = pem_pair(ec.generate_private_key(ec.SECP256R1()))


def unsigned(payload: dict[str, Any]) -> str:
    """A token with `alg: none` and no signature, as an attacker would forge it."""
    return jwt.encode(payload, None, algorithm="none")


async def first_json_event(service: Service, query: str, **kwargs: Any) -> dict[str, Any]:
    client = await SseClient.open(service.port, query + "&format=json", **kwargs)
    event = await client.expect()
    assert event.event == "status"
    body: dict[str, Any] = json.loads(event.data)
    if body["status"] != "ok":
        assert event.retry is not None
        assert await client.next_event() is None  # closed after a refusal
    await client.close()
    return body


FORGED: list[tuple[str, Callable[[], str], str]] = [
    ("valid", lambda: jwt.encode(claims(), SECRET, "HS256"), "ok"),
    ("wrong secret", lambda: jwt.encode(claims(), OTHER, "HS256"), "invalid_token"),
    ("alg none", lambda: unsigned(claims()), "invalid_token"),
    ("HS512 not configured", lambda: jwt.encode(claims(), SECRET, "HS512"), "invalid_token"),
    ("expired", lambda: jwt.encode(claims(exp=int(time.time()) - 60), SECRET, "HS256"), "expired"),
    ("no exp", lambda: jwt.encode(claims(exp=None), SECRET, "HS256"), "invalid_token"),
    ("no sub", lambda: jwt.encode(claims(sub=None), SECRET, "HS256"), "invalid_token"),
    (
        "not yet valid",
        lambda: jwt.encode(claims(nbf=int(time.time()) + 3600), SECRET, "HS256"),
        "not_yet_valid",
    ),
    (
        "sub with a colon",
        lambda: jwt.encode(claims(sub="1:channels"), SECRET, "HS256"),
        "invalid_user",
    ),
    ("sub path", lambda: jwt.encode(claims(sub="../2"), SECRET, "HS256"), "invalid_user"),
    ("sub glob", lambda: jwt.encode(claims(sub="*"), SECRET, "HS256"), "invalid_user"),
    ("garbage", lambda: "not.a.token", "invalid_token"),
    ("truncated", lambda: jwt.encode(claims(), SECRET, "HS256")[:-5], "invalid_token"),
    ("RS256 when only HS256", lambda: jwt.encode(claims(), RSA_PRIVATE, "RS256"), "invalid_token"),
]


@pytest.mark.parametrize(("name", "make", "expected"), FORGED, ids=[f[0] for f in FORGED])
async def test_forged_expired_and_wrong_algorithm_tokens_get_failure(
    make_service: ServiceFactory, name: str, make: Callable[[], str], expected: str
) -> None:
    """Only a token signed with the secret, unexpired, with a valid sub opens a stream."""
    service = await make_service(secret=SECRET)
    await grant(service.port, "1", "room:1")
    body = await first_json_event(service, f"token={make()}")
    if expected == "ok":
        assert body == {"status": "ok"}
    else:
        assert body == {"status": "failure", "reason": expected}


async def test_bare_user_parameter_is_refused_with_a_secret(make_service: ServiceFactory) -> None:
    """With a secret configured, `?user=1` alone gets `failure` (the XML flavour by default)."""
    service = await make_service(secret=SECRET)
    await grant(service.port, "1", "room:1")
    client = await SseClient.open(service.port, "user=1")
    assert [e.data for e in await client.until_closed()] == [status("failure")]


async def test_token_of_one_user_never_opens_another_users_stream(
    make_service: ServiceFactory,
) -> None:
    """A token for user 1 with ?user=2 is refused; with ?user=1 or no user it opens user 1."""
    service = await make_service(secret=SECRET)
    await grant(service.port, "1", "room:1")
    await grant(service.port, "2", "room:2")
    token = mint_token(SECRET, "1")
    assert await first_json_event(service, f"token={token}&user=2") == {
        "status": "failure",
        "reason": "user_mismatch",
    }
    client = await SseClient.open(service.port, f"token={token}")
    assert (await client.expect()).data == status("ok")
    assert set(service.hub.channels()) == {"user:1", "room:1"}


@pytest.mark.parametrize("carrier", ["query", "bearer", "cookie"])
async def test_token_travels_in_query_header_or_cookie(
    make_service: ServiceFactory, carrier: str
) -> None:
    """The token is accepted as ?token=, as an Authorization: Bearer header, or as a cookie."""
    service = await make_service(secret=SECRET, token_cookie="sis")
    await grant(service.port, "1", "room:1")
    token = mint_token(SECRET, "1")
    query, headers = {
        "query": (f"token={token}", {}),
        "bearer": ("", {"Authorization": f"Bearer {token}"}),
        "cookie": ("", {"Cookie": f"other=x; sis={token}"}),
    }[carrier]
    client = await SseClient.open(service.port, query, headers=headers)
    assert (await client.expect()).data == status("ok")


async def test_public_key_tokens_and_no_confusion_with_hmac(make_service: ServiceFactory) -> None:
    """RS256 and ES256 tokens verify with the public key; an HS256 token keyed with it fails."""
    service = await make_service(public_key=RSA_PUBLIC, algorithms=("RS256",))
    await grant(service.port, "1", "room:1")
    good = jwt.encode(claims(), RSA_PRIVATE, "RS256")
    assert await first_json_event(service, f"token={good}") == {"status": "ok"}
    # The classic confusion attack: sign HS256 with the public key's text as the secret.
    import base64
    import hashlib
    import hmac as hmac_module

    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signature = hmac_module.new(RSA_PUBLIC.encode(), header + b"." + payload, hashlib.sha256)
    forged = b".".join(
        [header, payload, base64.urlsafe_b64encode(signature.digest()).rstrip(b"=")]
    ).decode()
    assert (await first_json_event(service, f"token={forged}"))["status"] == "failure"

    ec_service = await make_service(public_key=EC_PUBLIC, algorithms=("ES256",))
    await grant(ec_service.port, "1", "room:1")
    ec_token = jwt.encode(claims(), EC_PRIVATE, "ES256")
    assert await first_json_event(ec_service, f"token={ec_token}") == {"status": "ok"}


async def test_audience_and_issuer_are_checked(make_service: ServiceFactory) -> None:
    """With an audience and issuer configured, tokens lacking or mismatching them fail."""
    service = await make_service(secret=SECRET, audience="sisyphus", issuer="app")
    await grant(service.port, "1", "room:1")
    good = jwt.encode(claims(aud="sisyphus", iss="app"), SECRET, "HS256")
    assert await first_json_event(service, f"token={good}") == {"status": "ok"}
    for bad in (claims(), claims(aud="other", iss="app"), claims(aud="sisyphus", iss="evil")):
        body = await first_json_event(service, f"token={jwt.encode(bad, SECRET, 'HS256')}")
        assert body == {"status": "failure", "reason": "invalid_token"}


async def test_previous_secret_is_accepted_until_its_deadline(make_service: ServiceFactory) -> None:
    """After a rotation, tokens of the previous secret work until the configured time only."""
    old_token = mint_token(OTHER, "1")
    current = await make_service(
        secret=SECRET, previous_secret=OTHER, previous_secret_until=time.time() + 3600
    )
    await grant(current.port, "1", "room:1")
    assert await first_json_event(current, f"token={old_token}") == {"status": "ok"}
    new_token = mint_token(SECRET, "1")
    assert await first_json_event(current, f"token={new_token}") == {"status": "ok"}
    expired_rotation = await make_service(
        secret=SECRET, previous_secret=OTHER, previous_secret_until=time.time() - 1
    )
    await grant(expired_rotation.port, "1", "room:1")
    assert (await first_json_event(expired_rotation, f"token={old_token}"))["status"] == "failure"


async def test_stream_ends_with_failure_when_its_token_expires(
    make_service: ServiceFactory,
) -> None:
    """At the token's expiry plus the leeway the stream gets `failure` (`expired`), long retry."""
    clock = {"now": time.time()}
    service = await make_service(secret=SECRET, wall_clock=lambda: clock["now"])
    await grant(service.port, "1", "room:1")
    token = mint_token(SECRET, "1", ttl=600)
    client = await SseClient.open(service.port, f"token={token}&format=json")
    assert json.loads((await client.expect()).data) == {"status": "ok"}
    clock["now"] += 600 + service.settings.leeway + 1
    events = [e for e in await client.until_closed() if e.event != "noop"]
    assert [json.loads(e.data) for e in events] == [{"status": "failure", "reason": "expired"}]
    assert events[0].retry == service.settings.failure_retry_ms
    assert service.metrics.tokens_expired == 1


async def test_development_mode_warns_loudly(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a secret, start-up and streams log that anyone can listen as anyone."""
    with caplog.at_level(logging.WARNING):
        service = await make_service()
        await grant(service.port, "1", "room:1")
        client = await SseClient.open(service.port, "user=1")
        assert (await client.expect()).data == status("ok")
    messages = [r.getMessage() for r in caplog.records]
    assert any("ANYONE CAN LISTEN AS ANYONE" in m for m in messages)
    assert any("DEVELOPMENT MODE: stream for user=1" in m for m in messages)


async def test_tokens_and_api_keys_never_reach_the_logs(
    make_service: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Neither valid nor rejected tokens, nor the API key, appear in any log line."""
    api_key = "api-key-that-must-stay-secret"
    with caplog.at_level(logging.DEBUG):
        service = await make_service(secret=SECRET, api_key=api_key)
        from tests.conftest import api

        await api(service.port, "/api/grant", {"user": "1", "channels": ["room:1"]}, api_key)
        await api(service.port, "/api/grant", {"user": "1", "channels": ["room:1"]}, "wrong-key")
        good = mint_token(SECRET, "1")
        bad = jwt.encode(claims(), OTHER, "HS256")
        for query, headers in ((f"token={good}", {}), (f"token={bad}", {})):
            client = await SseClient.open(service.port, query, headers=headers)
            await client.expect()
            await client.close()
        client = await SseClient.open(service.port, "", headers={"Authorization": f"Bearer {bad}"})
        await client.expect()
    text = caplog.text + repr(service.settings)
    for secret_text in (good, bad, api_key, "wrong-key", SECRET):
        assert secret_text not in text
