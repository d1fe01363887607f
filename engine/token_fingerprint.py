"""A salted fingerprint of a hub token: what the adapter cache keys a tenant's entries by, so a
private adapter fetched with one token is never served to a job without it, while the token
itself is never written anywhere (not in cache keys, directory names, logs or stats).

fingerprint(token) = hex(HMAC-SHA256(salt, token))[:24]   (96 bits: no two tenants collide)

The salt is 32 random bytes in a file beside the disk cache (created once, mode 0600), so the
fingerprints, and with them the tenants' cache directories, survive restarts and are shared by
every worker using that directory; without the salt a fingerprint cannot be checked against a
list of candidate tokens. Deleting the salt file orphans every tenant directory: delete those too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SALT_BYTES = 32
FINGERPRINT_CHARS = 24


class TokenFingerprint:
    def __init__(self, salt_file: str | os.PathLike) -> None:
        """Read the salt from `salt_file`, creating it (and its directory) if absent."""
        self._salt = _read_or_create(Path(salt_file))

    def __call__(self, token: str) -> str:
        return hmac.new(self._salt, token.encode(), hashlib.sha256).hexdigest()[:FINGERPRINT_CHARS]


def _read_or_create(path: Path) -> bytes:
    """Written to a temporary file, then linked into place: a worker sharing the directory reads
    either no salt file or a whole one, and two racing workers end up with the same salt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(SALT_BYTES))
        try:
            os.link(tmp, path)
        except FileExistsError:  # another worker won the race: use its salt
            pass
        finally:
            tmp.unlink()
    salt = path.read_bytes()
    if len(salt) != SALT_BYTES:
        raise ValueError(f"{path} is not a {SALT_BYTES}-byte salt file")
    return salt
