"""The keyring and its AEAD format: what decrypts, and that everything else is CiphertextInvalid."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import KeysSettings
from broker.crypto import Keyring, associated_data, generate_key, key_id_of, load_keyring
from broker.crypto.keys import parse_keyring
from broker.errors import CiphertextInvalid, ConfigError

AAD = associated_data("test", "row-1", "access_token")
SECRET = b"at-plaintext-\x00\xff-token"


def keyring(*kids: str) -> Keyring:
    return Keyring([(kid, os.urandom(32)) for kid in kids])


@pytest.fixture(scope="module")
def ring() -> Keyring:
    return keyring("k1")


def relabel(blob: bytes, kid: str) -> bytes:
    """The same nonce and ciphertext under a header naming another key id."""
    old_len = blob[1]
    raw = kid.encode()
    return bytes((blob[0], len(raw))) + raw + blob[2 + old_len :]


def test_round_trip_and_fresh_nonce(ring: Keyring) -> None:
    first = ring.encrypt(SECRET, AAD)
    second = ring.encrypt(SECRET, AAD)
    assert first != second, "every encryption needs a fresh nonce"
    assert first[0] == 1
    assert key_id_of(first) == "k1"
    assert SECRET not in first
    assert ring.decrypt(first, AAD) == SECRET
    assert ring.decrypt(second, AAD) == SECRET
    assert ring.decrypt(ring.encrypt(b"", AAD), AAD) == b""


@pytest.mark.parametrize(
    "other",
    [
        associated_data("production", "row-1", "access_token"),
        associated_data("test", "row-2", "access_token"),
        associated_data("test", "row-1", "refresh_token"),
        b"",
    ],
    ids=["other-environment", "other-row", "other-column", "no-aad"],
)
def test_associated_data_binds_place(ring: Keyring, other: bytes) -> None:
    blob = ring.encrypt(SECRET, AAD)
    with pytest.raises(CiphertextInvalid):
        ring.decrypt(blob, other)


def test_associated_data_fields_cannot_run_together() -> None:
    # "a" + "b/c" must not read the same as "a/b" + "c".
    assert associated_data("t", "ab", "c") != associated_data("t", "a", "bc")
    assert associated_data("t", "a", "b") != associated_data("ta", "", "b")


def test_header_key_id_cannot_be_relabelled() -> None:
    ring = keyring("k1", "k2", "k-longer")
    blob = ring.encrypt(SECRET, AAD)
    assert key_id_of(blob) == "k1"
    for kid in ("k2", "k-longer"):
        moved = relabel(blob, kid)
        assert key_id_of(moved) == kid
        with pytest.raises(CiphertextInvalid):
            ring.decrypt(moved, AAD)
    # Same key under two ids: the id is authenticated even when the key would work.
    key = os.urandom(32)
    twins = Keyring([("a1", key), ("b1", key)])
    with pytest.raises(CiphertextInvalid):
        twins.decrypt(relabel(twins.encrypt(SECRET, AAD), "b1"), AAD)


def test_unknown_key_id_is_named(ring: Keyring) -> None:
    blob = keyring("gone").encrypt(SECRET, AAD)
    with pytest.raises(CiphertextInvalid, match="gone"):
        ring.decrypt(blob, AAD)


def test_secondary_key_decrypts_primary_encrypts() -> None:
    old_key = os.urandom(32)
    old = Keyring([("old", old_key)])
    rotated = Keyring([("new", os.urandom(32)), ("old", old_key)])
    blob = old.encrypt(SECRET, AAD)
    assert rotated.decrypt(blob, AAD) == SECRET
    assert rotated.needs_rotation(blob)
    fresh = rotated.encrypt(SECRET, AAD)
    assert key_id_of(fresh) == "new"
    assert not rotated.needs_rotation(fresh)
    with pytest.raises(CiphertextInvalid, match="new"):
        old.decrypt(fresh, AAD)


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x01", b"\x02\x02k1" + bytes(40), b"\x01\x09k1", b"\x01\x02k1" + bytes(27)],
    ids=["empty", "header-only", "unknown-version", "short-key-id", "truncated"],
)
def test_malformed_blobs(ring: Keyring, blob: bytes) -> None:
    with pytest.raises(CiphertextInvalid):
        ring.decrypt(blob, AAD)


def _assert_flip_fails(ring: Keyring, blob: bytes, position: int, mask: int) -> None:
    tampered = bytearray(blob)
    tampered[position] ^= mask
    try:
        result = ring.decrypt(bytes(tampered), AAD)
    except CiphertextInvalid:
        return
    pytest.fail(f"flip at {position} mask {mask:#x} decrypted to {result!r}")


FLIP_KEYS = {kid: os.urandom(32) for kid in ("k1", "k2", "k3", "key.with-a_longer.id")}


@settings(max_examples=300, deadline=None)
@given(
    plaintext=st.binary(max_size=64),
    kid=st.sampled_from(sorted(FLIP_KEYS)),
    data=st.data(),
)
def test_every_single_byte_flip_fails(plaintext: bytes, kid: str, data: st.DataObject) -> None:
    # The primary varies so the header length varies; all keys decrypt, so a flip that lands
    # on another key id must still fail.
    ring = Keyring([(kid, FLIP_KEYS[kid]), *((k, v) for k, v in FLIP_KEYS.items() if k != kid)])
    blob = ring.encrypt(plaintext, AAD)
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    _assert_flip_fails(ring, blob, position, mask)


def test_every_single_byte_flip_fails_exhaustively() -> None:
    ring = keyring("k1", "k2")
    blob = ring.encrypt(b"short-token", AAD)
    for position in range(len(blob)):
        for mask in range(1, 256):
            _assert_flip_fails(ring, blob, position, mask)


def test_repr_shows_no_key_material() -> None:
    key = os.urandom(32)
    ring = Keyring([("k1", key), ("k2", os.urandom(32))])
    text = repr(ring) + str(ring)
    assert "k1" in text
    assert "k2" in text
    assert base64.b64encode(key).decode() not in text
    assert key.hex() not in text
    assert repr(key) not in text
    assert not hasattr(ring, "__dict__"), "keys must not hide in an instance dict"


# -- parse_keyring / load_keyring -------------------------------------------------------------


def test_parse_keyring_first_key_is_primary() -> None:
    text = f"# keys\n{generate_key('b2')}\n\n{generate_key('a1')}, {generate_key('c3')}\n"
    ring = parse_keyring(text, "BROKER_KEYS")
    assert ring.ids == ("b2", "a1", "c3")
    assert ring.primary_id == "b2"
    assert key_id_of(ring.encrypt(SECRET, AAD)) == "b2"


def test_generate_key_default_id_parses() -> None:
    entry = generate_key()
    ring = parse_keyring(entry, "generated")
    assert ring.primary_id == entry.partition(":")[0]
    assert len(base64.b64decode(entry.partition(":")[2])) == 32


GOOD = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("k1:not*base64!", "'k1' is not valid base64"),
        (f"k1:{base64.b64encode(bytes(16)).decode()}", "'k1' must be 32 bytes"),
        (f"k1:{GOOD},k1:{GOOD}", "'k1' appears twice"),
        ("", "holds no key"),
        ("# only a comment\n", "holds no key"),
        (GOOD, "entry 1 must be KID:BASE64KEY"),
        (f"k1:{GOOD},bad id:{GOOD}", "entry 2 must be KID:BASE64KEY"),
    ],
    ids=["bad-base64", "wrong-length", "duplicate-id", "empty", "comment-only", "no-id", "bad-id"],
)
def test_parse_keyring_errors_name_the_source(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keyring(text, "BROKER_KEYS")
    message = str(caught.value)
    assert message.startswith("BROKER_KEYS: "), message
    assert expected in message
    assert GOOD not in message, "an error must not echo key material"


def test_empty_keyring_says_how_to_make_a_key() -> None:
    with pytest.raises(ConfigError, match="broker keygen"):
        parse_keyring("", "BROKER_KEYS")


def test_load_keyring_sources(tmp_path: Path) -> None:
    env_entry, file_entry = generate_key("from-env"), generate_key("from-file")
    path = tmp_path / "keys"
    path.write_text(file_entry + "\n")
    path.chmod(0o600)  # a key file others can read is refused (tests/test_keys.py)
    assert load_keyring(KeysSettings(file=path)).ids == ("from-file",)
    both = KeysSettings(file=path, keys=env_entry)
    assert load_keyring(both).ids == ("from-env",)
    with pytest.raises(ConfigError, match="broker keygen"):
        load_keyring(KeysSettings())
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"keys\.file.*nope"):
        load_keyring(KeysSettings(file=missing))
    path.write_text("k1:short\n")
    with pytest.raises(ConfigError, match=rf"keys\.file \({path}\): key 'k1'"):
        load_keyring(KeysSettings(file=path))
