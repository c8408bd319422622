"""Pseudonymous patient identifiers for everything a run publishes.

Case ids come from file and folder names, and clinical folder names often carry a patient's name or hospital
number. With ``--pseudonymize`` every id that leaves the machine (MLflow params, metrics files, per-patient
tables, overlay titles, error messages) is replaced by ``pt-`` + the first 16 hex digits of
HMAC-SHA256(salt, case id). The salt is a secret kept beside the run (``.pseudonym_salt``, mode 0600) or given
in ``$LASEGSEG_PSEUDONYM_SALT``; without it the aliases cannot be reversed by hashing guessed names. The key
that maps aliases back (``pseudonyms.csv``, mode 0600) is written locally and never logged.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

from lasegseg.errors import ConfigError
from lasegseg.fsio import atomic_write

SALT_ENV = "LASEGSEG_PSEUDONYM_SALT"
SALT_FILE = ".pseudonym_salt"
KEY_FILE = "pseudonyms.csv"
PREFIX = "pt-"


class Pseudonymizer:
    """Maps case ids to salted-hash aliases and scrubs known ids out of free text.

    Args:
        salt: the secret salt (at least 16 bytes).
        case_ids: the ids :meth:`scrub` should find in text (``alias`` works for any id).
    """

    def __init__(self, salt: bytes, case_ids: Iterable[str] = ()) -> None:
        if len(salt) < 16:
            raise ConfigError(f"{SALT_ENV}: the pseudonym salt must be at least 16 bytes, got {len(salt)}")
        self._salt = salt
        ids = sorted({str(c) for c in case_ids if str(c)}, key=len, reverse=True)  # longest first: no partial hits
        self._pattern = (
            re.compile(r"(?<![A-Za-z0-9])(" + "|".join(re.escape(i) for i in ids) + r")(?![A-Za-z0-9])")
            if ids
            else None
        )

    def alias(self, case_id: str) -> str:
        """The stable pseudonym of ``case_id`` under this salt."""
        digest = hmac.new(self._salt, str(case_id).encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[:16]

    def __call__(self, case_id: str) -> str:
        return self.alias(case_id)

    def scrub(self, text: str) -> str:
        """``text`` with every known case id (as a whole token, e.g. inside a path) replaced by its alias."""
        if self._pattern is None or not text:
            return text
        return self._pattern.sub(lambda m: self.alias(m.group(1)), text)

    def write_key(self, path: Path, case_ids: Iterable[str]) -> Path:
        """Write (or extend) the local alias → case id table, readable by the owner only."""
        path = Path(path)
        rows = {}
        if path.is_file():
            with open(path, newline="", encoding="utf-8") as fh:
                rows = {r["alias"]: r["case_id"] for r in csv.DictReader(fh)}
        rows.update({self.alias(c): str(c) for c in case_ids})
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["alias", "case_id"])
        writer.writerows(sorted(rows.items(), key=lambda kv: kv[1]))
        return atomic_write(path, text.getvalue(), mode=0o600)


def load_or_create_salt(folder: Path) -> bytes:
    """The salt from ``$LASEGSEG_PSEUDONYM_SALT``, else ``folder/.pseudonym_salt`` (created, mode 0600).

    The same folder gives the same salt, so a resumed sweep or a rerun keeps its aliases.

    Args:
        folder: the run or sweep folder that keeps the salt.
    """
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode("utf-8")
    path = Path(folder) / SALT_FILE
    if not path.is_file():
        # First writer wins; a concurrent one reads the winner's salt, so all processes share one set of aliases.
        atomic_write(path, secrets.token_hex(32) + "\n", mode=0o600, exclusive=True)
    salt = path.read_text().strip().encode("utf-8")
    if len(salt) < 16:
        raise ConfigError(f"{path}: pseudonym salt is too short (remove the file to create a new one)")
    return salt
