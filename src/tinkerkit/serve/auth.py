"""API keys of ``tinkerkit serve``: who may call, and who owns what.

Security model:

* The SDK sends its key in the ``X-API-Key`` header; keys have the SDK's form ``tml-...``.
* Bound to a loopback address (the default, ``127.0.0.1``) and started without ``--api-keys``,
  the server accepts any key of that form: only local users can reach it, and the key only
  separates their sessions from each other.
* Bound to any other address, the server requires ``--api-keys FILE`` and answers 401 to a
  request without one of the listed keys. Keys are compared in constant time.
* A key owns the sessions, training runs and checkpoints created with it; requests with another
  key see none of them (404, as if they did not exist). On disk a run records the key's
  SHA-256 digest (:func:`owner_id`), never the key; keys are never logged.
* External-weights download URLs carry an HMAC signature (a random per-process secret) and an
  expiry instead of a key, as the hosted service's signed URLs do; they stop working when the
  server restarts or the URL expires.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path

from tinkerkit.errors import ConfigError, RequestError

KEY_PREFIX = "tml-"
API_KEY_HEADER = "X-API-Key"


def owner_id(api_key: str) -> str:
    """The stable owner id of a key: hex SHA-256 of a fixed prefix and the key (64 chars)."""
    return hashlib.sha256(b"tinkerkit-serve owner\0" + api_key.encode("utf-8")).hexdigest()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_keys(path: str | Path) -> frozenset[str]:
    """Read an API key file: one key per line; blank lines and ``#`` comments are skipped.

    Raises:
        ConfigError: The file cannot be read, a line is not a ``tml-`` key without spaces
            (named by line, the key itself is not printed), or the file lists no key.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the API key file: {e}") from e
    keys = set()
    for number, line in enumerate(lines, start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        if not key.startswith(KEY_PREFIX) or len(key) <= len(KEY_PREFIX) or len(key.split()) > 1:
            raise ConfigError(f"{path}:{number}: an API key must be one word starting with "
                              f"'{KEY_PREFIX}'")
        keys.add(key)
    if not keys:
        raise ConfigError(f"{path}: the API key file lists no key")
    return frozenset(keys)


class Authenticator:
    """Checks API keys and signs download URLs.

    Args:
        keys: The accepted keys, or None to accept any ``tml-`` key (loopback only; the caller
            enforces that, see :func:`tinkerkit.serve.app.make_server`).
    """

    def __init__(self, keys: frozenset[str] | None) -> None:
        self._keys = keys
        self._secret = secrets.token_bytes(32)

    @property
    def requires_listed_keys(self) -> bool:
        """Whether only the keys of an API key file are accepted."""
        return self._keys is not None

    def owner(self, api_key: str | None) -> str:
        """The owner id of a request's key.

        Raises:
            RequestError: 401 when the key is missing, not of the SDK's form, or not listed.
        """
        if not api_key:
            raise RequestError(401, f"missing API key (the {API_KEY_HEADER} header)")
        if not api_key.startswith(KEY_PREFIX):
            raise RequestError(401, f"invalid API key: keys start with '{KEY_PREFIX}'")
        if self._keys is not None:
            encoded = api_key.encode("utf-8")
            # compare_digest against every key: the time taken does not depend on which matched
            matches = [hmac.compare_digest(encoded, key.encode("utf-8")) for key in self._keys]
            if not any(matches):
                raise RequestError(401, "invalid API key: not one of the server's keys")
        return owner_id(api_key)

    def sign(self, message: str) -> str:
        """Hex HMAC-SHA256 of ``message`` under this process's secret."""
        return hmac.new(self._secret, message.encode("utf-8"), hashlib.sha256).hexdigest()

    def verify(self, message: str, signature: str) -> bool:
        """Whether ``signature`` is :meth:`sign` of ``message`` (constant time)."""
        return hmac.compare_digest(self.sign(message), signature)
