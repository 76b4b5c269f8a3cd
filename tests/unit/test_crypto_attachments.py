"""Matrix encrypted attachments (bridge.crypto.attachments): round trips, a NIST vector,
interoperability with matrix-nio, tampering, malformed EncryptedFile objects, and streaming."""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from nio.crypto.attachments import (
    decrypt_attachment,
    encrypt_attachment,
    encrypted_attachment_generator,
)

from bridge.crypto.attachments import (
    AttachmentError,
    Decryptor,
    Encryptor,
    decrypt_stream,
    encrypt_stream,
)

URL = "mxc://example.org/abcdefghijklmnop"

# NIST SP 800-38A, F.5.5 (CTR-AES256.Encrypt): an independent known answer.
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_IV = bytes.fromhex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
NIST_PLAINTEXT = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a"
    "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef"
    "f69f2445df4f9b17ad2b417be66c3710"
)
NIST_CIPHERTEXT = bytes.fromhex(
    "601ec313775789a5b7a7f504bbf3d228"
    "f443e3ca4d62b59aca84e990cacaf5c5"
    "2b0930daa23de94ce87017ba2d84988d"
    "dfc9c58db67aada613c2dd08457941a6"
)


def b64(data: bytes, *, urlsafe: bool = False, padded: bool = False) -> str:
    text = (base64.urlsafe_b64encode(data) if urlsafe else base64.b64encode(data)).decode()
    return text if padded else text.rstrip("=")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.replace("+", "-").replace("/", "_") + "==")


def hand_made_file(
    key: bytes, iv: bytes, ciphertext: bytes, *, padded: bool = False
) -> dict[str, Any]:
    """An EncryptedFile written by hand from the spec, not by the module under test."""
    return {
        "url": URL,
        "v": "v2",
        "key": {
            "kty": "oct",
            "key_ops": ["encrypt", "decrypt"],
            "alg": "A256CTR",
            "k": b64(key, urlsafe=True, padded=padded),
            "ext": True,
        },
        "iv": b64(iv, padded=padded),
        "hashes": {"sha256": b64(hashlib.sha256(ciphertext).digest(), padded=padded)},
    }


def split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def aiter_of(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def collect(stream: AsyncIterator[bytes]) -> list[bytes]:
    return [chunk async for chunk in stream]


async def encrypt(plaintext: bytes, chunk_size: int = 4096) -> tuple[bytes, dict[str, Any]]:
    encryptor = Encryptor()
    out = await collect(encrypt_stream(aiter_of(split(plaintext, chunk_size)), encryptor))
    return b"".join(out), encryptor.file(URL)


async def decrypt(ciphertext: bytes, file: dict[str, Any], chunk_size: int = 4096) -> bytes:
    return b"".join(await collect(decrypt_stream(aiter_of(split(ciphertext, chunk_size)), file)))


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 65536 + 7])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 17, 4099])
async def test_round_trip(size: int, chunk_size: int) -> None:
    plaintext = os.urandom(size)
    encryptor = Encryptor()
    sizes_in = [len(c) for c in split(plaintext, chunk_size)]
    out = await collect(encrypt_stream(aiter_of(split(plaintext, chunk_size)), encryptor))
    assert [len(c) for c in out] == sizes_in
    ciphertext = b"".join(out)
    if size >= 16:
        assert ciphertext != plaintext
    file = encryptor.file(URL)

    # Decrypt with chunk boundaries different from the ones used to encrypt.
    assert await decrypt(ciphertext, file, chunk_size=13) == plaintext
    assert await decrypt(ciphertext, file, chunk_size=chunk_size) == plaintext


async def test_encrypted_file_shape() -> None:
    ciphertext, file = await encrypt(b"hello, world" * 100)
    assert set(file) == {"url", "v", "key", "iv", "hashes"}
    assert file["url"] == URL
    assert file["v"] == "v2"
    key = file["key"]
    assert key["kty"] == "oct"
    assert key["alg"] == "A256CTR"
    assert key["ext"] is True
    assert sorted(key["key_ops"]) == ["decrypt", "encrypt"]
    for text in (key["k"], file["iv"], file["hashes"]["sha256"]):
        assert "=" not in text  # unpadded
    assert "+" not in key["k"] and "/" not in key["k"]  # url-safe
    assert "-" not in file["iv"] and "_" not in file["iv"]  # standard alphabet
    assert len(unb64(key["k"])) == 32
    iv = unb64(file["iv"])
    assert len(iv) == 16 and iv[8:] == b"\x00" * 8
    assert unb64(file["hashes"]["sha256"]) == hashlib.sha256(ciphertext).digest()


async def test_each_encryptor_has_its_own_key_and_iv() -> None:
    files = [Encryptor().file(URL) for _ in range(20)]
    assert len({f["key"]["k"] for f in files}) == 20
    assert len({f["iv"] for f in files}) == 20


async def test_file_is_stable_and_finishes_the_encryptor() -> None:
    encryptor = Encryptor()
    encryptor.update(b"abc")
    first = encryptor.file(URL)
    assert encryptor.file("mxc://example.org/other") == {**first, "url": "mxc://example.org/other"}
    with pytest.raises(RuntimeError):
        encryptor.update(b"more")


async def test_empty_file_hash() -> None:
    ciphertext, file = await encrypt(b"")
    assert ciphertext == b""
    assert unb64(file["hashes"]["sha256"]) == hashlib.sha256(b"").digest()
    assert await decrypt(b"", file) == b""


# --- known vector, written independently ----------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
async def test_decrypt_nist_vector(chunk_size: int) -> None:
    file = hand_made_file(NIST_KEY, NIST_IV, NIST_CIPHERTEXT)
    assert await decrypt(NIST_CIPHERTEXT, file, chunk_size) == NIST_PLAINTEXT


async def test_decrypt_hand_made_file_padded_or_not_and_either_alphabet() -> None:
    # A key whose base64 has every character that differs between the two alphabets.
    key = bytes([0xFB, 0xFF, 0xBF] * 10 + [0xFB, 0xFF])
    iv = bytes([0xFB, 0xFF, 0xBF] * 2 + [0xFB, 0xFF]) + b"\x00" * 8
    assert "-" in b64(key, urlsafe=True) and "_" in b64(key, urlsafe=True)
    plaintext = b"interoperability, byte for byte " * 3
    enc = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    ciphertext = enc.update(plaintext) + enc.finalize()

    for padded in (False, True):
        file = hand_made_file(key, iv, ciphertext, padded=padded)
        assert await decrypt(ciphertext, file, 7) == plaintext
    # Lenient on the alphabet too: a standard-base64 'k', a url-safe iv.
    file = hand_made_file(key, iv, ciphertext)
    file["key"]["k"] = b64(key)
    file["iv"] = b64(iv, urlsafe=True)
    assert await decrypt(ciphertext, file, 7) == plaintext


# --- interoperability with matrix-nio (pycryptodome, written by others) ----------------------


@pytest.mark.parametrize("size", [0, 1, 31, 4096, 100_003])
async def test_nio_encrypts_we_decrypt(size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext, info = encrypt_attachment(plaintext)
    file = {"url": URL, **info}
    assert await decrypt(ciphertext, file, chunk_size=1000) == plaintext


async def test_nio_streaming_generator_we_decrypt() -> None:
    chunks = [os.urandom(n) for n in (3, 17, 4096, 1, 9999)]
    *encrypted, info = list(encrypted_attachment_generator(chunks))
    assert isinstance(info, dict)
    ciphertext = b"".join(encrypted)  # type: ignore[arg-type]
    assert await decrypt(ciphertext, {"url": URL, **info}, chunk_size=333) == b"".join(chunks)


@pytest.mark.parametrize("size", [0, 1, 31, 4096, 100_003])
async def test_we_encrypt_nio_decrypts(size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext, file = await encrypt(plaintext, chunk_size=777)
    decrypted = decrypt_attachment(
        ciphertext, file["key"]["k"], file["hashes"]["sha256"], file["iv"]
    )
    assert decrypted == plaintext


# --- integrity ------------------------------------------------------------------------------


async def test_tampered_ciphertext_fails_verify() -> None:
    plaintext = os.urandom(5000)
    ciphertext, file = await encrypt(plaintext)
    tampered = bytearray(ciphertext)
    tampered[2500] ^= 0x01

    decryptor = Decryptor(file)
    out = b"".join(decryptor.update(c) for c in split(bytes(tampered), 1024))
    assert len(out) == len(plaintext)  # garbage came out as the chunks went by...
    with pytest.raises(AttachmentError, match="hash mismatch"):
        decryptor.verify()  # ...and is refused at the end

    with pytest.raises(AttachmentError, match="hash mismatch"):
        await decrypt(bytes(tampered), file)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-1],  # truncated
        lambda c: c + b"\x00",  # extended
        lambda c: b"",  # nothing at all
    ],
    ids=["truncated", "extended", "empty"],
)
async def test_wrong_length_ciphertext_fails(mangle: Callable[[bytes], bytes]) -> None:
    ciphertext, file = await encrypt(os.urandom(300))
    with pytest.raises(AttachmentError, match="hash mismatch"):
        await decrypt(mangle(ciphertext), file)


async def test_stream_yields_everything_before_failing() -> None:
    """Documented behaviour: the hash error comes after the last chunk, so callers must wait."""
    ciphertext, file = await encrypt(os.urandom(3000))
    ciphertext = ciphertext[:-1] + bytes([ciphertext[-1] ^ 0xFF])
    seen: list[bytes] = []
    with pytest.raises(AttachmentError):
        async for chunk in decrypt_stream(aiter_of(split(ciphertext, 1000)), file):
            seen.append(chunk)
    assert [len(c) for c in seen] == [1000, 1000, 1000]


async def test_wrong_key_is_not_detected_by_the_hash() -> None:
    """The hash covers the ciphertext: another valid key gives garbage, not an error."""
    plaintext = os.urandom(1000)
    ciphertext, file = await encrypt(plaintext)
    other = copy.deepcopy(file)
    other["key"]["k"] = b64(os.urandom(32), urlsafe=True)
    assert await decrypt(ciphertext, other) != plaintext


async def test_verify_is_repeatable_and_finishes_the_decryptor() -> None:
    ciphertext, file = await encrypt(b"x" * 100)
    decryptor = Decryptor(file)
    assert decryptor.update(ciphertext) == b"x" * 100
    decryptor.verify()
    decryptor.verify()
    with pytest.raises(RuntimeError):
        decryptor.update(b"more")


# --- malformed EncryptedFile objects ---------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def apply(file: dict[str, Any]) -> None:
        target = file
        for name in parents:
            target = target[name]
        target[last] = value

    return apply


def _delete(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, last = path.split(".")

    def apply(file: dict[str, Any]) -> None:
        target = file
        for name in parents:
            target = target[name]
        del target[last]

    return apply


MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("v1", _set("v", "v1"), r"version 'v1'.*only 'v2'"),
    ("no-version", _delete("v"), r"version missing"),
    ("v3", _set("v", "v3"), r"version 'v3'"),
    ("short-key", _set("key.k", b64(os.urandom(16), urlsafe=True)), r"key 'k' is 16 bytes.*32"),
    ("long-key", _set("key.k", b64(os.urandom(33), urlsafe=True)), r"key 'k' is 33 bytes"),
    ("key-not-base64", _set("key.k", "not base64 at all!"), r"key 'k' is not valid base64"),
    ("key-bad-length", _set("key.k", "abcde"), r"key 'k' is not valid base64"),
    ("key-not-str", _set("key.k", 12345), r"key 'k' is not a string"),
    ("no-k", _delete("key.k"), r"key 'k' is not a string"),
    ("wrong-alg", _set("key.alg", "A128CTR"), r"algorithm 'A128CTR'.*A256CTR"),
    ("no-alg", _delete("key.alg"), r"key algorithm missing"),
    ("wrong-kty", _set("key.kty", "RSA"), r"key type 'RSA'.*oct"),
    ("no-key", _delete("key"), r"key is missing"),
    ("key-not-object", _set("key", "abc"), r"key is missing or not an object"),
    ("short-iv", _set("iv", b64(os.urandom(8))), r"iv is 8 bytes.*16"),
    ("no-iv", _delete("iv"), r"iv is not a string"),
    ("iv-not-base64", _set("iv", "%%%%"), r"iv is not valid base64"),
    ("no-hashes", _delete("hashes"), r"hashes.sha256 is missing"),
    ("no-sha256", _set("hashes", {"sha512": "abc"}), r"hashes.sha256 is missing"),
    ("short-sha256", _set("hashes.sha256", b64(b"\x00" * 20)), r"hashes.sha256 is 20 bytes"),
    ("sha256-not-base64", _set("hashes.sha256", "é" * 43), r"hashes.sha256 is not valid base64"),
]


@pytest.mark.parametrize(
    ("mangle", "message"), [(m, msg) for _, m, msg in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
async def test_malformed_file_is_refused(
    mangle: Callable[[dict[str, Any]], None], message: str
) -> None:
    ciphertext, file = await encrypt(b"secret" * 10)
    bad = copy.deepcopy(file)
    mangle(bad)
    with pytest.raises(AttachmentError, match=message) as caught:
        Decryptor(bad)
    assert file["key"]["k"] not in str(caught.value)
    if isinstance(bad.get("key"), dict) and isinstance(bad["key"].get("k"), str):
        assert bad["key"]["k"] not in str(caught.value)

    # The stream refuses before yielding anything.
    stream = decrypt_stream(aiter_of([ciphertext]), bad)
    with pytest.raises(AttachmentError, match=message):
        await anext(stream)


async def test_not_a_mapping_is_refused() -> None:
    with pytest.raises(AttachmentError, match="not an object"):
        Decryptor("mxc://example.org/x")  # type: ignore[arg-type]


async def test_reprs_do_not_show_the_key() -> None:
    encryptor = Encryptor()
    file = encryptor.file(URL)
    assert file["key"]["k"] not in repr(encryptor)
    assert file["key"]["k"] not in repr(Decryptor(file))


# --- streaming ------------------------------------------------------------------------------

CHUNK = 64 * 1024
TOTAL = 20 * 1024 * 1024


async def test_streaming_20_mb_in_64_kib_chunks(tmp_path: Path) -> None:
    """20 MB through both directions, one 64 KiB chunk at a time, with bounded memory."""
    source_hash = hashlib.sha256()
    sizes_in: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for _ in range(TOTAL // CHUNK):
            chunk = os.urandom(CHUNK)
            source_hash.update(chunk)
            sizes_in.append(len(chunk))
            yield chunk

    encrypted_path = tmp_path / "ciphertext"
    encryptor = Encryptor()
    sizes_out: list[int] = []
    tracemalloc.start()
    try:
        with encrypted_path.open("wb") as out:
            async for chunk in encrypt_stream(source(), encryptor):
                sizes_out.append(len(chunk))
                out.write(chunk)
        _, encrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    file = encryptor.file(URL)
    assert sizes_out == sizes_in == [CHUNK] * (TOTAL // CHUNK)
    assert encrypted_path.stat().st_size == TOTAL

    async def read_back() -> AsyncIterator[bytes]:
        with encrypted_path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk

    plain_hash = hashlib.sha256()
    plain_sizes: list[int] = []
    tracemalloc.start()
    try:
        async for chunk in decrypt_stream(read_back(), file):
            plain_sizes.append(len(chunk))
            plain_hash.update(chunk)
        _, decrypt_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert plain_sizes == [CHUNK] * (TOTAL // CHUNK)
    assert plain_hash.digest() == source_hash.digest()

    # A few chunks at most in flight, nowhere near the 20 MB of the file.
    assert encrypt_peak < 8 * CHUNK, encrypt_peak
    assert decrypt_peak < 8 * CHUNK, decrypt_peak
