"""HTTP basic auth for every endpoint but the probes and the ingest API, with the bcrypt users of the
web-config file (exporter.web.webconfig).

bcrypt is slow on purpose, so verified (user, password) pairs are cached under a keyed hash: a scrape
every few seconds costs one HMAC, not one bcrypt; bcrypt itself runs off the event loop behind a small
limiter.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping

from exporter.hook.schema import INGEST_PATH
from exporter.web.asgi import ASGIApp, Receive, Scope, Send

# Paths basic auth never guards: probes (no credentials, no data) and the ingest API (bearer token).
DEFAULT_UNPROTECTED_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz", INGEST_PATH})


class BasicAuth:
    """Checks ``Authorization: Basic`` credentials against bcrypt hashes, with a bounded cache.

    The cache maps HMAC(process secret, user, password) to the verdict, so neither passwords nor
    reusable hashes of them are kept in memory, and a repeated wrong password costs no bcrypt either.
    Unknown users are checked against a dummy hash so timing does not reveal which users exist.
    """

    def __init__(self, users: Mapping[str, bytes], cache_size: int = 1024) -> None:
        import bcrypt

        self._bcrypt = bcrypt
        self._users = dict(users)
        self._secret = secrets.token_bytes(32)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # Unknown users are checked against this, at the highest cost configured ("$2b$12$..." -> 12):
        # a cheaper dummy would answer faster for them and tell which user names exist.
        cost = max((int(h.split(b"$")[2]) for h in self._users.values()), default=10)
        self._dummy = bcrypt.hashpw(b"not a password", bcrypt.gensalt(rounds=cost))
        self.bcrypt_checks = 0  # how often bcrypt actually ran (tests, self-knowledge)

    @staticmethod
    def parse_header(value: str | None) -> tuple[str, str] | None:
        """(user, password) from an Authorization header value, or None if absent/malformed."""
        if not value:
            return None
        scheme, _, param = value.strip().partition(" ")
        if scheme.lower() != "basic" or not param:
            return None
        try:
            decoded = base64.b64decode(param.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user, sep, password = decoded.partition(":")
        return (user, password) if sep else None

    def _key(self, user: str, password: str) -> bytes:
        msg = user.encode("utf-8", "surrogatepass") + b"\0" + password.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, msg, hashlib.sha256).digest()

    def cached(self, user: str, password: str) -> bool | None:
        """The cached verdict, or None when bcrypt has to run (see :meth:`verify`)."""
        key = self._key(user, password)
        with self._lock:
            verdict = self._cache.get(key)
            if verdict is not None:
                self._cache.move_to_end(key)
            return verdict

    def verify(self, user: str, password: str) -> bool:
        """Full check (may run bcrypt: ~50-250 ms, call it off the event loop)."""
        verdict = self.cached(user, password)
        if verdict is not None:
            return verdict
        hashed = None
        for name, value in self._users.items():
            # constant-time over the name; the loop visits every user whatever matches
            if hmac.compare_digest(name.encode("utf-8", "surrogatepass"), user.encode("utf-8", "surrogatepass")):
                hashed = value
        try:
            ok = self._bcrypt.checkpw(password.encode("utf-8", "surrogatepass")[:72], hashed or self._dummy)
        except ValueError:
            ok = False
        ok = ok and hashed is not None
        self.bcrypt_checks += 1
        with self._lock:
            self._cache[self._key(user, password)] = ok
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return ok


class BasicAuthMiddleware:
    """Pure ASGI middleware (streaming responses pass through untouched) that demands basic auth.

    Add it with ``app.add_middleware(BasicAuthMiddleware, auth=BasicAuth(users))``. bcrypt runs in a
    worker thread behind a small limiter, so a flood of wrong passwords cannot stall the event loop or
    take every thread the app's sync endpoints need.
    """

    def __init__(
        self,
        app: ASGIApp,
        auth: BasicAuth,
        unprotected_paths: Iterable[str] = DEFAULT_UNPROTECTED_PATHS,
        realm: str = "gpu-exporter",
    ) -> None:
        import anyio

        self.app = app
        self.auth = auth
        self.unprotected = frozenset(unprotected_paths)
        self._challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode("latin-1")
        self._limiter = anyio.CapacityLimiter(2)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.unprotected:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        creds = BasicAuth.parse_header(header)
        ok = False
        if creds is not None:
            verdict = self.auth.cached(*creds)
            if verdict is None:
                import anyio.to_thread

                verdict = await anyio.to_thread.run_sync(self.auth.verify, *creds, limiter=self._limiter)
            ok = verdict
        if ok:
            await self.app(scope, receive, send)
            return
        body = b"Unauthorized: this exporter requires HTTP basic auth (see its web-config file)\n"
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"www-authenticate", self._challenge),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
