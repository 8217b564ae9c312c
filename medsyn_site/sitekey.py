"""The site key: the site's secret for pseudonymous case ids (a keyed hash) and for signing
provenance. Created once (the first `medsyn data prepare` or `medsyn site-key new`), never replaced."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from medsyn_site.errors import MedsynError

log = logging.getLogger(__name__)
DEFAULT_SITE_KEY = Path(os.environ.get("MEDSYN_SITE_KEY", "~/.config/medsyn/site.key")).expanduser()


class SiteKeyError(MedsynError):
    """The site key is missing or unreadable."""


def new_site_key(path: Path = DEFAULT_SITE_KEY) -> Path:
    """Create a site key (mode 0600); an existing key is never replaced (it would change every id)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SiteKeyError(f"{path}: a site key exists already; it is kept (replacing it would change every "
                           "case id and invalidate every signed provenance)") from None
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    log.warning("created a new site key at %s (keep it secret and back it up: it makes case ids stable "
                "and signs provenance)", path)
    return path


def load_site_key(path: Path = DEFAULT_SITE_KEY, create: bool = False) -> bytes:
    """The site's secret for hashing identifiers and signing provenance. Created only when asked
    (``create``: a site's first ``data prepare``); sampling and publishing need an existing key, so
    a mistyped path fails instead of silently signing with a new key.

    A keyed hash (HMAC) keeps ids stable across runs at the site, and unlike a plain hash of a
    medical record number it cannot be reversed by trying every possible number.
    """
    path = Path(path)
    if not path.exists():
        if not create:
            raise SiteKeyError(f"{path}: site key not found; it is created by the first `medsyn data prepare` "
                               f"or by `medsyn site-key new {path}`")
        new_site_key(path)
    key = path.read_text().strip().encode()
    if not key:
        raise SiteKeyError(f"{path}: the site key file is empty")
    return key


def pseudonym(key: bytes, value: str, prefix: str) -> str:
    return f"{prefix}-{hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:16]}"
