"""JWTs: :class:`JWTAuthorizer` in process, and ``serve --jwt-secret / --jwt-public-key``.

Every claim and refusal is checked in process (our wire server over a memory stream, on
``autojump_clock``). A real ``canvas-store-trio serve`` on loopback shows the options wired
up: each key type and the secret's variable, auth-refresh, ``--authorize`` behind the
JWT; the command line's mistakes exit 2 in one line; and the real npm client signs in with
a token and is closed when it refreshes with an expired one.

PyJWT reads the wall clock, not Trio's, so expiry is minted minutes away from
``time.time()`` rather than waited for.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from trio_websocket import open_websocket_url

from canvas_store_trio import (
    AuthorizeInfo,
    AuthorizeResult,
    JWTAuthorizer,
    RoomManager,
    SessionInfo,
    TokenRefused,
)
from canvas_store_trio.testing import FrameClient

from .conftest import connect, frames_of, node_modules
from .processes import Server, server_process
from .test_front_door import assert_one_line_error, run_cli

SECRET = "a-test-secret-that-is-over-32-bytes"
ROOM = "board"
DROP: Any = object()
"""A claim value that leaves the claim out."""

NOTE = {"n/Note": {"_exists": True, "text": "hello"}}


def mint(*, key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    """A token for ``room`` ROOM and ``sub`` alice, with ``claims`` added (DROP removes)."""
    payload = {"room": ROOM, "sub": "alice", **claims}
    payload = {name: value for name, value in payload.items() if value is not DROP}
    return jwt.encode(payload, key, algorithm=algorithm)


def forge_hs256(secret: bytes, **claims: Any) -> str:
    """An HS256 token signed with ``secret`` (a public key's PEM, which PyJWT will not take)."""

    def part(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    signed = b".".join(part(json.dumps(value).encode())
                       for value in ({"alg": "HS256", "typ": "JWT"}, {"room": ROOM, **claims}))
    return (signed + b"." + part(hmac.new(secret, signed, hashlib.sha256).digest())).decode()


def minutes(n: float) -> int:
    """A NumericDate ``n`` minutes from now (negative: ago)."""
    return int(time.time() + 60 * n)


def query(client_id: str, token: str | None, room: str = ROOM) -> str:
    params = {"roomId": room, "clientId": client_id}
    if token is not None:
        params["token"] = token
    return urlencode(params)


PRIVATE_KEYS: dict[str, Callable[[], PrivateKeyTypes]] = {
    "RS256": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "EdDSA": ed25519.Ed25519PrivateKey.generate,
}


@functools.cache
def private_key(algorithm: str, which: int = 0) -> PrivateKeyTypes:
    return PRIVATE_KEYS[algorithm]()


def public_pem(algorithm: str) -> bytes:
    return private_key(algorithm).public_key().public_bytes(
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


# --- in process: every claim and every refusal ---------------------------------------


@pytest.fixture
async def manager() -> AsyncIterator[RoomManager]:
    async with RoomManager() as manager:
        yield manager


def session(manager: RoomManager, client_id: str = "c1") -> SessionInfo:
    room = manager.get_existing_room(ROOM)
    assert room is not None
    [found] = [info for info in room.get_sessions() if info.client_id == client_id]
    return found


async def edit_applies(manager: RoomManager, client: FrameClient, key: str = "n/Note") -> bool:
    """Send an edit of ``key``, wait for its ack, say whether the room took it."""
    await client.send(type="patch", messageId=key, documentPatches=[{key: NOTE["n/Note"]}])
    await client.receive_until("ack")
    room = manager.get_existing_room(ROOM)
    assert room is not None
    return key in room.get_snapshot().state


async def refusal(manager: RoomManager, authorizer: JWTAuthorizer,
                  token: str | None) -> tuple[int | None, str | None]:
    async with connect(manager, query("c1", token), authorize=authorizer) as client:
        return await client.closed()


@pytest.mark.parametrize(("claim", "permissions", "applies"), [
    ("readwrite", "readwrite", True),
    ("readonly", "readonly", False),
    (DROP, "readwrite", True),  # the documented default
])
async def test_permissions_claim_decides_whether_edits_apply(
    autojump_clock: Any, manager: RoomManager, claim: Any, permissions: str, applies: bool
) -> None:
    token = mint(permissions=claim)
    async with connect(manager, query("c1", token), authorize=JWTAuthorizer(secret=SECRET)) as c:
        await c.reconnect()
        assert (session(manager).permissions, session(manager).metadata) == (
            permissions, {"user": "alice"})
        assert await edit_applies(manager, c) is applies


@pytest.mark.parametrize(("sub", "user"), [("alice", "alice"), (DROP, None)])
async def test_sub_becomes_the_metadata_user(
    autojump_clock: Any, manager: RoomManager, sub: Any, user: str | None
) -> None:
    async with connect(manager, query("c1", mint(sub=sub)),
                       authorize=JWTAuthorizer(secret=SECRET)) as client:
        await client.reconnect()
        assert session(manager).metadata == {"user": user}


@pytest.mark.parametrize("room", [ROOM, ["other", ROOM], "*", ["*"]])
async def test_room_claim_admits_its_rooms(
    autojump_clock: Any, manager: RoomManager, room: Any
) -> None:
    async with connect(manager, query("c1", mint(room=room)),
                       authorize=JWTAuthorizer(secret=SECRET)) as client:
        frames = await client.reconnect()
        assert frames[-1]["type"] == "synced"


AUD = {"audience": "canvas", "issuer": "https://auth.test"}
"""JWTAuthorizer options for the audience and issuer cases."""

REFUSALS: dict[str, tuple[dict[str, Any], Callable[[], str | None], str]] = {
    "missing token": ({}, lambda: None, "Missing token query parameter"),
    "empty token": ({}, lambda: "", "Missing token query parameter"),
    "malformed": ({}, lambda: "not-a-jwt", "invalid token: Not enough segments"),
    "garbage segments": ({}, lambda: "a.b.c", "invalid token: "),
    "expired": ({}, lambda: mint(exp=minutes(-5)), "token expired"),
    "nbf in the future": ({}, lambda: mint(nbf=minutes(5)), "token not valid yet"),
    "iat in the future": ({}, lambda: mint(iat=minutes(5)), "token not valid yet"),
    "wrong signature": ({}, lambda: mint(key="another-secret-also-over-32-bytes!"),
                        "token signature does not verify"),
    "alg none": ({}, lambda: mint(key=None, algorithm="none"), "token algorithm not accepted"),
    "alg HS512": ({}, lambda: mint(key=SECRET * 2, algorithm="HS512"),
                  "token algorithm not accepted"),
    "wrong room": ({}, lambda: mint(room="other"), "token not valid for room 'board'"),
    "wrong rooms": ({}, lambda: mint(room=["a", "b"]), "token not valid for room 'board'"),
    "no room claim": ({}, lambda: mint(room=DROP), "token 'room' claim must be"),
    "room claim a number": ({}, lambda: mint(room=7), "token 'room' claim must be"),
    "bad permissions": ({}, lambda: mint(permissions="admin"),
                        "token 'permissions' claim must be 'readonly' or 'readwrite'"),
    "sub not a string": ({}, lambda: mint(sub=5), "invalid token: "),
    "aud unexpected": ({}, lambda: mint(aud="canvas"), "token audience not accepted"),
    "wrong audience": (AUD, lambda: mint(aud="other", iss=AUD["issuer"]),
                       "token audience not accepted"),
    "no audience": (AUD, lambda: mint(iss=AUD["issuer"]), 'missing the "aud" claim'),
    "wrong issuer": (AUD, lambda: mint(aud="canvas", iss="https://evil.test"),
                     "token issuer not accepted"),
    "no issuer": (AUD, lambda: mint(aud="canvas"), 'missing the "iss" claim'),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
async def test_bad_tokens_are_refused_with_1008_a_reason_and_one_log_line(
    autojump_clock: Any, manager: RoomManager, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    options, make_token, reason = REFUSALS[case]
    caplog.set_level(logging.INFO, "canvas_store_trio")
    code, got = await refusal(manager, JWTAuthorizer(secret=SECRET, **options), make_token())
    assert code == 1008 and got is not None and reason in got, got
    assert SECRET not in got
    [line] = [r for r in caplog.records if "refused client" in r.getMessage()]
    assert reason in line.getMessage() and line.exc_info is None
    assert manager.room_ids() == []  # refused before the room was opened


async def test_audience_and_issuer_that_match_are_admitted(
    autojump_clock: Any, manager: RoomManager
) -> None:
    token = mint(aud=["other", "canvas"], iss=AUD["issuer"])
    async with connect(manager, query("c1", token), authorize=JWTAuthorizer(
            secret=SECRET, **AUD)) as client:
        assert (await client.reconnect())[-1]["type"] == "synced"


async def test_leeway_admits_a_token_that_just_expired(
    autojump_clock: Any, manager: RoomManager
) -> None:
    token = mint(exp=int(time.time()) - 10)
    assert (await refusal(manager, JWTAuthorizer(secret=SECRET), token)) == (1008, "token expired")
    async with connect(manager, query("c1", token),
                       authorize=JWTAuthorizer(secret=SECRET, leeway=60)) as client:
        assert (await client.reconnect())[-1]["type"] == "synced"


@pytest.mark.parametrize("algorithm", sorted(PRIVATE_KEYS))
async def test_a_public_key_verifies_its_own_algorithm_only(
    autojump_clock: Any, manager: RoomManager, algorithm: str
) -> None:
    authorizer = JWTAuthorizer(public_key=public_pem(algorithm).decode())
    good = mint(key=private_key(algorithm), algorithm=algorithm)
    async with connect(manager, query("c1", good), authorize=authorizer) as client:
        assert (await client.reconnect())[-1]["type"] == "synced"
        assert session(manager).metadata == {"user": "alice"}
    other_key = mint(key=private_key(algorithm, 1), algorithm=algorithm)
    assert await refusal(manager, authorizer, other_key) == (
        1008, "token signature does not verify")
    # The classic confusion: an HMAC token keyed with the public key's PEM.
    confused = forge_hs256(public_pem(algorithm), sub="mallory")
    assert await refusal(manager, authorizer, confused) == (1008, "token algorithm not accepted")
    assert await refusal(manager, authorizer, mint(key=None, algorithm="none")) == (
        1008, "token algorithm not accepted")


async def test_auth_refresh_checks_the_new_token(
    autojump_clock: Any, manager: RoomManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "canvas_store_trio")
    authorizer = JWTAuthorizer(secret=SECRET)
    async with connect(manager, query("c1", mint()), authorize=authorizer) as client:
        await client.reconnect()
        assert await edit_applies(manager, client, "a/Note")
        await client.send(type="auth-refresh", token=mint(permissions="readonly", sub="bob"))
        await trio.sleep(1)
        assert (session(manager).permissions, session(manager).metadata) == (
            "readonly", {"user": "bob"})
        assert not await edit_applies(manager, client, "b/Note")
        await client.send(type="auth-refresh", token=mint(room=["*"]))
        await trio.sleep(1)
        assert await edit_applies(manager, client, "c/Note")


@pytest.mark.parametrize(("token", "reason"), [
    (lambda: mint(exp=minutes(-1)), "token expired"),
    (lambda: mint(room="other"), "token not valid for room 'board'"),
    (lambda: mint(key="another-secret-also-over-32-bytes!"), "token signature does not verify"),
    (lambda: mint(key=None, algorithm="none"), "token algorithm not accepted"),
    (lambda: "not-a-jwt", "invalid token"),
])
async def test_auth_refresh_with_a_bad_token_closes_the_session_with_1008(
    autojump_clock: Any, manager: RoomManager, caplog: pytest.LogCaptureFixture,
    token: Callable[[], str], reason: str,
) -> None:
    caplog.set_level(logging.INFO, "canvas_store_trio")
    async with connect(manager, query("c1", mint(exp=minutes(5))),
                       authorize=JWTAuthorizer(secret=SECRET)) as client:
        await client.reconnect()
        await client.send(type="auth-refresh", token=token())
        code, said = await client.closed()
        assert code == 1008 and said is not None
        assert said.startswith("token refresh refused: ") and reason in said
        room = manager.get_existing_room(ROOM)
        assert room is not None and room.session_count() == 0
    [line] = [r for r in caplog.records if "token refresh refused" in r.getMessage()]
    assert reason in line.getMessage() and line.exc_info is None


async def test_a_hook_behind_the_jwt_sees_the_claims_and_narrows_the_session(
    autojump_clock: Any, manager: RoomManager
) -> None:
    seen: list[AuthorizeInfo] = []

    async def hook(info: AuthorizeInfo) -> AuthorizeResult:
        seen.append(info)
        assert info.claims is not None
        if info.claims["sub"] == "mallory":
            raise PermissionError("mallory is banned")
        if info.claims["sub"] == "carol":
            return AuthorizeResult("readonly")  # no metadata: the token's is kept
        return AuthorizeResult("readwrite", {"user": info.claims["sub"], "team": "blue"})

    authorizer = JWTAuthorizer(secret=SECRET, then=hook)
    assert await refusal(manager, authorizer, mint(sub="mallory")) == (1008, "mallory is banned")
    assert await refusal(manager, authorizer, mint(exp=minutes(-1))) == (1008, "token expired")
    assert [info.claims and info.claims["sub"] for info in seen] == ["mallory"]  # JWT first

    async with connect(manager, query("c1", mint(permissions="readonly")),
                       authorize=authorizer) as client:
        await client.reconnect()
        info = seen[-1]
        assert (info.room_id, info.client_id, info.request is not None) == (ROOM, "c1", True)
        assert info.claims == {"room": ROOM, "sub": "alice", "permissions": "readonly"}
        # The token's readonly is a ceiling the hook's readwrite does not lift.
        assert (session(manager).permissions, session(manager).metadata) == (
            "readonly", {"user": "alice", "team": "blue"})
        await client.send(type="auth-refresh", token=mint(sub="carol"))
        await trio.sleep(1)
        assert seen[-1].request is None and seen[-1].claims is not None
        assert (session(manager).permissions, session(manager).metadata) == (
            "readonly", {"user": "carol"})  # the hook's readonly wins over the token's
        await client.send(type="auth-refresh", token=mint(sub="mallory"))
        code, said = await client.closed()
        assert code == 1008 and said is not None and said.startswith("token refresh refused: ")


def test_bad_secrets_and_keys_are_refused_when_made() -> None:
    with pytest.raises(ValueError, match="a secret or a public key"):
        JWTAuthorizer()
    with pytest.raises(ValueError, match="a secret or a public key"):
        JWTAuthorizer(secret=SECRET, public_key=public_pem("ES256"))
    with pytest.raises(ValueError, match="HMAC key is 10 bytes") as short:
        JWTAuthorizer(secret="tiny-words")
    assert "tiny-words" not in str(short.value)
    private_pem = private_key("ES256").private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    for not_public in (private_pem, b"hello", "-----BEGIN PUBLIC KEY-----\nAAAA\n"):
        with pytest.raises(ValueError, match="not a PEM public key"):
            JWTAuthorizer(public_key=not_public)
    with pytest.raises(ValueError, match="not X25519PublicKey"):
        JWTAuthorizer(public_key=x25519.X25519PrivateKey.generate().public_key())
    with pytest.raises(ValueError, match="not an EC key on secp256k1"):
        JWTAuthorizer(public_key=ec.generate_private_key(ec.SECP256K1()).public_key())
    with pytest.raises(ValueError, match="RSA key is 1024 bits"):
        JWTAuthorizer(public_key=rsa.generate_private_key(65537, 1024).public_key())


async def test_token_refused_is_a_permission_error_apps_can_catch() -> None:
    authorizer = JWTAuthorizer(secret=SECRET)
    assert authorizer.verify(mint(), ROOM)["sub"] == "alice"
    with pytest.raises(PermissionError, match="token expired"):
        authorizer.verify(mint(exp=minutes(-1)), ROOM)
    with pytest.raises(TokenRefused, match="not valid for room 'x'"):
        await authorizer(AuthorizeInfo("x", "c1", mint()))


# --- a real server process -------------------------------------------------------------


@asynccontextmanager
async def real_client(server: Server, client_id: str, token: str | None
                      ) -> AsyncIterator[FrameClient]:
    async with open_websocket_url(f"ws://127.0.0.1:{server.port}/?{query(client_id, token)}"
                                  ) as ws:
        yield FrameClient(ws)


def write_key(folder: Path, algorithm: str) -> Path:
    path = folder / f"{algorithm}.pem"
    path.write_bytes(public_pem(algorithm))
    return path


@pytest.mark.parametrize("how", ["--jwt-secret", "$CANVAS_STORE_JWT_SECRET", *PRIVATE_KEYS])
async def test_serve_admits_signed_tokens_and_refuses_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "--jwt-secret":
        options, key, algorithm = ["--jwt-secret", SECRET], SECRET, "HS256"
    elif how.startswith("$"):
        monkeypatch.setenv("CANVAS_STORE_JWT_SECRET", SECRET)
        options, key, algorithm = [], SECRET, "HS256"
    else:
        options = ["--jwt-public-key", str(write_key(tmp_path, how))]
        key, algorithm = private_key(how), how
    async with server_process("--memory", *options) as server:
        async with real_client(server, "good", mint(key=key, algorithm=algorithm)) as client:
            assert (await client.reconnect())[-1]["type"] == "synced"
        async with real_client(server, "late", mint(key=key, algorithm=algorithm,
                                                    exp=minutes(-1))) as client:
            assert await client.closed() == (1008, "token expired")
        async with real_client(server, "none", mint(key=None, algorithm="none")) as client:
            assert await client.closed() == (1008, "token algorithm not accepted")
        if algorithm != "HS256":
            async with real_client(server, "confused", forge_hs256(public_pem(how))) as client:
                assert await client.closed() == (1008, "token algorithm not accepted")
        async with real_client(server, "anon", None) as client:
            assert await client.closed() == (1008, "Missing token query parameter")
    log = server.log.decode()
    assert f"sessions need a JWT signed with {algorithm}" in log
    assert "Traceback" not in log and SECRET not in log
    assert log.count("refused client") == (4 if algorithm != "HS256" else 3)


async def test_serve_checks_audience_issuer_and_every_auth_refresh() -> None:
    def token(**claims: Any) -> str:
        return mint(aud="canvas", iss="https://auth.test", **claims)

    async with server_process("--memory", "--jwt-secret", SECRET, "--jwt-audience", "canvas",
                              "--jwt-issuer", "https://auth.test") as server:
        async with real_client(server, "other-aud", mint(aud="x", iss="https://auth.test")) as c:
            assert await c.closed() == (1008, "token audience not accepted")
        async with real_client(server, "other-iss", mint(aud="canvas", iss="x")) as c:
            assert await c.closed() == (1008, "token issuer not accepted")
        async with real_client(server, "watcher", token(sub="w")) as watcher, \
                real_client(server, "editor", token(permissions="readonly")) as editor:
            await watcher.reconnect()
            await editor.reconnect()
            await watcher.drain()
            await editor.send(type="patch", messageId="m1", documentPatches=[NOTE])
            await editor.receive_until("ack")
            assert frames_of(await watcher.drain(0.3), "patch") == []  # readonly: not applied
            await editor.send(type="auth-refresh", token=token(permissions="readwrite"))
            await trio.sleep(0.3)
            await editor.send(type="patch", messageId="m2", documentPatches=[NOTE])
            [patch] = frames_of(await watcher.receive_until("patch"), "patch")
            assert patch["documentPatches"] == [NOTE]
            await editor.send(type="auth-refresh", token=token(exp=minutes(-1)))
            assert await editor.closed() == (1008, "token refresh refused: token expired")
    log = server.log.decode()
    assert "token refresh refused: token expired" in log and "Traceback" not in log


HOOK = '''
import logging


def authorize(info):
    logging.getLogger("canvas_store_trio").info("hook saw %s", info.claims["sub"])
    if info.claims["sub"] == "mallory":
        raise PermissionError("mallory is banned")
    return {"permissions": "readwrite", "metadata": {"user": info.claims["sub"]}}
'''


async def test_serve_runs_the_authorize_hook_after_the_jwt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "jwt_hook.py").write_text(HOOK)
    monkeypatch.chdir(tmp_path)  # --authorize imports from the server's current folder
    async with server_process("--memory", "--jwt-secret", SECRET,
                              "--authorize", "jwt_hook:authorize") as server:
        async with real_client(server, "a", mint(sub="alice")) as client:
            assert (await client.reconnect())[-1]["type"] == "synced"
        async with real_client(server, "m", mint(sub="mallory")) as client:
            assert await client.closed() == (1008, "mallory is banned")
        async with real_client(server, "e", mint(sub="eve", exp=minutes(-1))) as client:
            assert await client.closed() == (1008, "token expired")
    log = server.log.decode()
    assert "hook saw alice" in log and "hook saw mallory" in log
    assert "hook saw eve" not in log  # the JWT is checked first


@pytest.fixture
def pem_files(tmp_path: Path) -> Path:
    write_key(tmp_path, "ES256")
    (tmp_path / "garbage.pem").write_text("hello\n")
    (tmp_path / "private.pem").write_bytes(private_key("ES256").private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return tmp_path


@pytest.mark.parametrize(("args", "env", "words"), [
    (["--jwt-secret", SECRET, "--jwt-public-key", "ES256.pem"], {},
     ["--jwt-secret", "--jwt-public-key", "give one"]),
    (["--jwt-public-key", "ES256.pem"], {"CANVAS_STORE_JWT_SECRET": SECRET},
     ["$CANVAS_STORE_JWT_SECRET", "--jwt-public-key"]),
    (["--jwt-public-key", "missing.pem"], {}, ["missing.pem", "No such file"]),
    (["--jwt-public-key", "garbage.pem"], {}, ["garbage.pem", "not a PEM public key"]),
    (["--jwt-public-key", "private.pem"], {}, ["private.pem", "not a PEM public key"]),
    (["--jwt-secret", "tiny-words"], {}, ["--jwt-secret", "HMAC key is 10 bytes"]),
    (["--jwt-audience", "canvas"], {}, ["--jwt-audience", "need --jwt-secret"]),
    (["--jwt-leeway", "30"], {}, ["--jwt-leeway", "need --jwt-secret"]),
])
def test_serve_jwt_mistakes_exit_2_in_one_line(
    pem_files: Path, args: list[str], env: dict[str, str], words: list[str]
) -> None:
    result = run_cli("serve", "--memory", "--port", "0", *args, cwd=pem_files, env=env)
    assert_one_line_error(result, *words)
    assert SECRET not in result.stderr and "tiny-words" not in result.stderr


# --- the real npm client -------------------------------------------------------------

JWT_CLIENT = Path(__file__).resolve().parent / "node" / "jwt_client.mjs"


async def npm_client(server: Server, client_id: str, token: str,
                     refresh: str | None = None) -> list[dict[str, Any]]:
    """tests/node/jwt_client.mjs: its events, up to the first close."""
    argv = ["node", str(JWT_CLIENT), "--url", f"ws://127.0.0.1:{server.port}/",
            "--room", ROOM, "--client", client_id, "--token", token,
            "--node-modules", node_modules()]
    if refresh is not None:
        argv += ["--refresh", refresh]
    with trio.fail_after(30):
        done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                      stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return [orjson.loads(line) for line in done.stdout.splitlines()]


@pytest.mark.node
async def test_the_npm_client_signs_in_and_is_closed_on_an_expired_refresh() -> None:
    node_modules()  # skip (or fail in CI) without Node and the packages
    async with server_process("--memory", "--jwt-secret", SECRET) as server:
        async with real_client(server, "watcher", mint(sub="w")) as watcher:
            await watcher.reconnect()
            events = await npm_client(server, "npm", mint(sub="npm"),
                                      refresh=mint(sub="npm", exp=minutes(-1)))
            assert [e["event"] for e in events] == ["synced", "ack", "refreshed", "closed"]
            assert events[-1] == {"event": "closed", "code": 1008,
                                  "reason": "token refresh refused: token expired"}
            patches = frames_of(await watcher.drain(0.3), "patch")
            assert {"npm/note": {"_exists": True, "text": "signed in"}} in [
                p for frame in patches for p in frame.get("documentPatches", [])]
        events = await npm_client(server, "late", mint(exp=minutes(-1)))
        assert events == [{"event": "closed", "code": 1008, "reason": "token expired"}]
