"""``JWTAuthorizer``: an ``authorize`` hook that admits a session on a signed JWT (PyJWT)."""

from __future__ import annotations

from typing import Any

import attrs
import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from jwt.algorithms import AllowedPublicKeys

from ..rooms._connection import Authorize, AuthorizeInfo, authorize_with
from ..rooms._session import PERMISSIONS, AuthorizeResult, Permissions

DEFAULT_PERMISSIONS: Permissions = "readwrite"
"""The permissions of a token without a ``permissions`` claim: its issuer signed it for
the room, which reads most plausibly as "may edit it" (as a session without any
``authorize`` hook may). Mint ``"permissions": "readonly"`` for viewers."""

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}

_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not valid yet"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidAlgorithmError, "token algorithm not accepted"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
)
"""What a client is told for PyJWT's refusals (its own messages are kept for the rest)."""


class TokenRefused(PermissionError):
    """A token that :class:`JWTAuthorizer` does not accept; the message says why.

    As an ``authorize`` hook's exception it closes the socket with 1008 and the message
    (on ``auth-refresh``, 1008 too). It names neither the secret nor the key.
    """


def load_public_key(pem: str | bytes) -> PublicKeyTypes:
    """A PEM public key (``-----BEGIN PUBLIC KEY-----``); ValueError for anything else."""
    try:
        return serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError("not a PEM public key") from None


def verifying_key(key: PublicKeyTypes) -> tuple[AllowedPublicKeys, list[str]]:
    """``key`` and the JWT algorithms it verifies: RS* and PS* for RSA, the ES* of an EC
    key's curve, EdDSA for Ed25519 and Ed448. ValueError for any other key."""
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in _EC_ALGORITHMS:
        return key, [_EC_ALGORITHMS[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return key, ["EdDSA"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        kind = f"an EC key on {key.curve.name}"
    else:
        kind = type(key).__name__
    raise ValueError(
        f"a JWT public key is RSA, EC (P-256, P-384, P-521), Ed25519 or Ed448, not {kind}"
    )


class JWTAuthorizer:
    """An ``authorize`` hook (for :func:`serve_connection`) that wants a signed JWT.

    Give ``secret`` (HS256, at least 32 bytes) or ``public_key`` (PEM text or a
    ``cryptography`` public key: RS256-512 and PS256-512 for RSA, ES256/384/512 for the
    matching EC curve, EdDSA for Ed25519/Ed448). Only those algorithms verify: never
    ``none``, and never an HMAC token against a public key. A bad secret or key raises
    ValueError here, not at the first connection.

    Each token, from the ``token`` query parameter on connect and from every
    ``auth-refresh`` frame, must have a valid signature; ``exp``, ``nbf`` and ``iat``
    (when present) must hold within ``leeway`` seconds; ``aud`` must match ``audience``
    (required when set; a token with an ``aud`` is refused without one) and ``iss`` must
    be ``issuer`` (required when set). Its claims:

    - ``room`` (required): the room id, a list of room ids, or ``"*"`` for any room;
    - ``permissions``: ``"readonly"`` or ``"readwrite"`` (absent: ``"readwrite"``);
    - ``sub``: the session's metadata becomes ``{"user": sub}`` (``None`` without one).

    Anything else raises :class:`TokenRefused` with a reason such as ``token expired``
    or ``token not valid for room 'x'``: the socket closes with 1008 and that reason (an
    ``auth-refresh`` refused closes it with 1008 too), the same as any hook's refusal.

    ``then`` is another ``authorize`` hook, run only once the token is verified. It sees
    the claims in ``AuthorizeInfo.claims``, may refuse, and its result combines with the
    token's: the session is readonly if either says so (the token's ``permissions`` are
    a ceiling), and has the hook's metadata, or ``{"user": sub}`` if it returns none.
    """

    def __init__(
        self,
        *,
        secret: str | bytes | None = None,
        public_key: str | bytes | PublicKeyTypes | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        then: Authorize | None = None,
    ) -> None:
        if secret is not None and public_key is None:
            self._key: str | bytes | AllowedPublicKeys = secret
            self.algorithms = ["HS256"]
        elif public_key is not None and secret is None:
            if isinstance(public_key, str | bytes):
                public_key = load_public_key(public_key)
            self._key, self.algorithms = verifying_key(public_key)
        else:
            raise ValueError("JWTAuthorizer wants a secret or a public key (one of them)")
        for name in self.algorithms:  # PyJWT's checks of the key, once (not per token)
            algorithm = jwt.get_algorithm_by_name(name)
            try:
                too_short = algorithm.check_key_length(algorithm.prepare_key(self._key))
            except jwt.InvalidKeyError as exc:
                raise ValueError(str(exc)) from None
            if too_short:
                raise ValueError(too_short)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.then = then

    def verify(self, token: str, room_id: str) -> dict[str, Any]:
        """The claims of ``token`` (with ``permissions`` filled in) if it is valid for
        ``room_id``; else :class:`TokenRefused`, whose message is the close reason."""
        if not token:
            raise TokenRefused("Missing token query parameter")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=self.algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
            )
        except jwt.PyJWTError as exc:
            reason = next((text for kind, text in _REASONS if isinstance(exc, kind)), None)
            raise TokenRefused(reason or f"invalid token: {exc}") from None
        rooms = claims.get("room")
        if isinstance(rooms, str):
            rooms = [rooms]
        if not isinstance(rooms, list) or not all(isinstance(room, str) for room in rooms):
            raise TokenRefused("token 'room' claim must be a room id, a list of them, or '*'")
        if room_id not in rooms and "*" not in rooms:
            raise TokenRefused(f"token not valid for room {room_id!r}")
        if claims.setdefault("permissions", DEFAULT_PERMISSIONS) not in PERMISSIONS:
            raise TokenRefused("token 'permissions' claim must be 'readonly' or 'readwrite'")
        return claims

    async def __call__(self, info: AuthorizeInfo) -> AuthorizeResult:
        claims = self.verify(info.token, info.room_id)
        result = AuthorizeResult(claims["permissions"], {"user": claims.get("sub")})
        if self.then is None:
            return result
        hooked = await authorize_with(self.then, attrs.evolve(info, claims=claims))
        both = (result.permissions, hooked.permissions)
        return AuthorizeResult(
            "readonly" if "readonly" in both else "readwrite",
            result.metadata if hooked.metadata is None else hooked.metadata,
        )
