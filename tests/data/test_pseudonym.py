from __future__ import annotations

import csv
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lasegseg.data.pseudonym import SALT_ENV, SALT_FILE, Pseudonymizer, load_or_create_salt
from lasegseg.errors import ConfigError

SALT = b"0123456789abcdef0123456789abcdef"


def test_alias_is_stable_salted_and_reveals_nothing():
    p = Pseudonymizer(SALT)
    a = p.alias("patient_JohnDoe_1958")
    assert a == Pseudonymizer(SALT).alias("patient_JohnDoe_1958")  # stable across processes and runs
    assert a.startswith("pt-") and len(a) == 19 and "JohnDoe" not in a
    assert a != Pseudonymizer(b"another-salt-of-16+bytes").alias("patient_JohnDoe_1958")  # salt matters
    assert a != p.alias("patient_JohnDoe_1959")


@given(st.lists(st.text(min_size=1, max_size=30), min_size=2, max_size=40, unique=True))
def test_distinct_ids_get_distinct_aliases(ids):
    p = Pseudonymizer(SALT)
    assert len({p.alias(i) for i in ids}) == len(ids)


def test_scrub_replaces_whole_tokens_in_paths_and_messages():
    p = Pseudonymizer(SALT, ["train_1", "train_12", "la_003"])
    text = "DataError: /data/train_12/enhanced.nii.gz: truncated; la_003 ok; train_123 and xla_003 are other words"
    out = p.scrub(text)
    assert p.alias("train_12") in out and p.alias("la_003") in out
    assert "/train_12/" not in out and " la_003 " not in out
    assert "train_123" in out and "xla_003" in out  # no partial matches
    assert p.alias("train_1") not in out


def test_salt_file_is_private_reused_and_overridable(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    first = load_or_create_salt(tmp_path)
    mode = stat.S_IMODE((tmp_path / SALT_FILE).stat().st_mode)
    assert mode == 0o600
    assert load_or_create_salt(tmp_path) == first  # a resumed sweep keeps its aliases
    assert len(first) >= 32
    monkeypatch.setenv(SALT_ENV, "a shared secret for all machines")
    assert load_or_create_salt(tmp_path) == b"a shared secret for all machines"


def test_concurrent_first_runs_share_the_first_writers_salt(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    with ThreadPoolExecutor(8) as pool:
        salts = set(pool.map(lambda _: load_or_create_salt(tmp_path), range(32)))
    assert salts == {(tmp_path / SALT_FILE).read_text().strip().encode()}
    assert [p.name for p in tmp_path.iterdir()] == [SALT_FILE]  # no temporary left behind


def test_short_salts_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(SALT_ENV, raising=False)
    with pytest.raises(ConfigError, match=SALT_ENV):
        Pseudonymizer(b"short")
    (tmp_path / SALT_FILE).write_text("abc\n")
    with pytest.raises(ConfigError, match=SALT_FILE):
        load_or_create_salt(tmp_path)


def test_key_table_maps_back_and_is_private(tmp_path):
    p = Pseudonymizer(SALT)
    path = p.write_key(tmp_path / "pseudonyms.csv", ["b", "a"])
    p.write_key(path, ["c"])  # extended, not replaced
    with open(path, newline="") as fh:
        rows = {r["alias"]: r["case_id"] for r in csv.DictReader(fh)}
    assert rows == {p.alias(c): c for c in "abc"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
