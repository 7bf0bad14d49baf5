"""Key files: an endpoint's identity at rest (the only I/O in the wire layer).

Format (ours, not Telehash): one CBOR map.

* ``{"format": "p2pcloud-key", "v": 1, "seed": <32 bytes>}``: an Ed25519 seed; the CS3a
  keys are derived from it (see p2pcloud._crypto.LocalIdentity).
* ``{"format": "p2pcloud-key", "v": 1, "cs3a": [<public>, <secret>]}``: a bare CS3a pair
  (an identity imported from telehash-js), which cannot sign.
* ``{"format": "p2pcloud-key", "v": 1, "sealed": {"kdf": "argon2id13", "ops": int,
  "mem": int, "salt": <16 bytes>, "nonce": <24 bytes>, "box": <secretbox>}}``: either of
  the above, CBOR-encoded, in a secretbox keyed by argon2id(passphrase).

Writes are atomic (temp file in the same directory, fsync, rename, fsync the directory), the
file is created with mode 0600, and loading never writes. Every failure is a
:class:`KeyFileError` (or :class:`WrongPassphrase`) whose message says what to do.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import cbor2
import nacl.bindings as _nb
import nacl.exceptions
import nacl.pwhash

from p2pcloud._crypto import LocalIdentity
from p2pcloud.errors import KeyFileError, LocalProtocolError, WrongPassphrase

__all__ = [
    "FORMAT",
    "KDF_MEM_DEFAULT",
    "KDF_MEM_MAX",
    "KDF_OPS_DEFAULT",
    "KDF_OPS_MAX",
    "MAX_KEYFILE",
    "VERSION",
    "load_identity",
    "save_identity",
]

FORMAT = "p2pcloud-key"
VERSION = 1

MAX_KEYFILE = 64 * 1024
"""Largest key file we read: a real one is under 200 bytes; the bound keeps a wrong path
(a disk image, a log) from being read into memory."""

KDF_OPS_DEFAULT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
KDF_MEM_DEFAULT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
"""argon2id cost for new sealed files: libsodium's "interactive" level (64 MiB), because the
daemon unlocks at start-up on phones and small boxes as well as laptops."""

KDF_OPS_MAX = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
KDF_MEM_MAX = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE
"""Highest cost a file may ask for (1 GiB): a corrupt or hostile file must not make loading
allocate without bound."""

_KDF_OPS_MIN = nacl.pwhash.argon2id.OPSLIMIT_MIN
_KDF_MEM_MIN = nacl.pwhash.argon2id.MEMLIMIT_MIN
_SALT_SIZE = nacl.pwhash.argon2id.SALTBYTES
_NONCE_SIZE = 24


def _payload(identity: LocalIdentity) -> dict[str, Any]:
    seed = identity.seed
    if seed is not None:
        return {"seed": seed}
    return {"cs3a": [identity.cs3a_public, identity.cs3a_secret]}


def _identity_from(payload: Any, where: str) -> LocalIdentity:
    if not isinstance(payload, dict):
        raise KeyFileError(f"{where}: key data is not a map; the file is corrupt, restore it")
    try:
        if "seed" in payload:
            seed = payload["seed"]
            if not isinstance(seed, bytes) or len(seed) != 32:
                raise KeyFileError(f"{where}: the seed is not 32 bytes; restore the file")
            return LocalIdentity.from_seed(seed)
        pair = payload.get("cs3a")
        if (
            isinstance(pair, list)
            and len(pair) == 2
            and all(isinstance(k, bytes) and len(k) == 32 for k in pair)
        ):
            return LocalIdentity.from_cs3a(pair[0], pair[1])
    except LocalProtocolError as exc:
        raise KeyFileError(f"{where}: the keys do not match ({exc}); restore the file") from exc
    raise KeyFileError(f"{where}: no seed or CS3a keys in the file; restore it from a backup")


def _derive(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    return nacl.pwhash.argon2id.kdf(
        32, passphrase.encode("utf-8"), salt, opslimit=ops, memlimit=mem
    )


def _encode(
    identity: LocalIdentity, passphrase: str | None, ops: int, mem: int, entropy_bytes: bytes
) -> bytes:
    payload = _payload(identity)
    doc: dict[str, Any] = {"format": FORMAT, "v": VERSION}
    if passphrase is None:
        doc.update(payload)
    else:
        salt, nonce = entropy_bytes[:_SALT_SIZE], entropy_bytes[_SALT_SIZE:]
        key = _derive(passphrase, salt, ops, mem)
        box = _nb.crypto_secretbox_easy(cbor2.dumps(payload), nonce, key)
        doc["sealed"] = {
            "kdf": "argon2id13",
            "ops": ops,
            "mem": mem,
            "salt": salt,
            "nonce": nonce,
            "box": box,
        }
    return bytes(cbor2.dumps(doc))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_identity(
    path: str | os.PathLike[str],
    identity: LocalIdentity,
    passphrase: str | None = None,
    *,
    overwrite: bool = False,
    kdf_ops: int = KDF_OPS_DEFAULT,
    kdf_mem: int = KDF_MEM_DEFAULT,
) -> None:
    """Write an identity to a key file atomically, mode 0600.

    Args:
        path: the key file.
        identity: the identity to store.
        passphrase: seal the keys with argon2id(passphrase) + secretbox when given.
        overwrite: replace an existing file (e.g. to change the passphrase). Off by default,
            so a start-up that failed to load a key can never destroy it by saving a new one.
        kdf_ops: argon2id operations limit (tests may lower it to the minimum).
        kdf_mem: argon2id memory limit in bytes.

    Raises:
        KeyFileError: the file exists (and ``overwrite`` is false), the directory is not
            writable, or the KDF limits are out of range.
    """
    target = Path(path)
    if passphrase is not None and not (
        _KDF_OPS_MIN <= kdf_ops <= KDF_OPS_MAX and _KDF_MEM_MIN <= kdf_mem <= KDF_MEM_MAX
    ):
        raise KeyFileError("argon2id limits out of range")
    if passphrase == "":
        raise KeyFileError("an empty passphrase seals nothing; pass None for an unsealed file")
    data = _encode(identity, passphrase, kdf_ops, kdf_mem, os.urandom(_SALT_SIZE + _NONCE_SIZE))
    directory = target.parent
    tmp = directory / f".{target.name}.{os.urandom(6).hex()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, target)
        else:
            # link() fails if the target exists, so two writers cannot both "win".
            os.link(tmp, target)
            os.unlink(tmp)
        _fsync_dir(directory)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{target}: a key file already exists; refusing to overwrite it "
            "(pass overwrite=True to replace it on purpose)"
        ) from exc
    except OSError as exc:
        raise KeyFileError(f"{target}: cannot write the key file: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_identity(path: str | os.PathLike[str], passphrase: str | None = None) -> LocalIdentity:
    """Read an identity from a key file. Never writes.

    Args:
        path: the key file.
        passphrase: needed when the file is sealed.

    Returns:
        The identity.

    Raises:
        WrongPassphrase: the file is sealed and the passphrase is missing or wrong.
        KeyFileError: missing, unreadable, too large, corrupt, truncated or of an unknown
            version; the message says what to do.
    """
    where = str(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_KEYFILE + 1)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{where}: no key file; create one (p2pcloud init)") from exc
    except OSError as exc:
        raise KeyFileError(f"{where}: cannot read the key file: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEYFILE:
        raise KeyFileError(f"{where}: larger than {MAX_KEYFILE} bytes, not a key file")
    try:
        doc = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several error types (and ValueError/TypeError)
        raise KeyFileError(
            f"{where}: corrupt or truncated key file; restore it from a backup"
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise KeyFileError(f"{where}: not a p2pcloud key file")
    version = doc.get("v")
    if version != VERSION:
        raise KeyFileError(
            f"{where}: key file version {version!r} is not supported (this p2pcloud reads "
            f"version {VERSION}); upgrade p2pcloud"
        )
    sealed = doc.get("sealed")
    if sealed is None:
        return _identity_from(doc, where)
    if passphrase is None:
        raise WrongPassphrase(f"{where}: the key file is sealed; give its passphrase")
    return _identity_from(_unseal(sealed, passphrase, where), where)


def _unseal(sealed: Any, passphrase: str, where: str) -> Any:
    if not isinstance(sealed, dict) or sealed.get("kdf") != "argon2id13":
        raise KeyFileError(f"{where}: unknown sealing method; upgrade p2pcloud")
    ops, mem = sealed.get("ops"), sealed.get("mem")
    salt, nonce, box = sealed.get("salt"), sealed.get("nonce"), sealed.get("box")
    if not (
        type(ops) is int
        and type(mem) is int
        and _KDF_OPS_MIN <= ops <= KDF_OPS_MAX
        and _KDF_MEM_MIN <= mem <= KDF_MEM_MAX
        and isinstance(salt, bytes)
        and len(salt) == _SALT_SIZE
        and isinstance(nonce, bytes)
        and len(nonce) == _NONCE_SIZE
        and isinstance(box, bytes)
    ):
        raise KeyFileError(f"{where}: corrupt sealing parameters; restore it from a backup")
    try:
        key = _derive(passphrase, salt, ops, mem)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, MemoryError) as exc:
        raise KeyFileError(f"{where}: cannot derive the key: {exc}") from exc
    try:
        plain = _nb.crypto_secretbox_open_easy(box, nonce, key)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError) as exc:
        # A wrong passphrase and an altered box look the same; the first is far likelier.
        raise WrongPassphrase(f"{where}: wrong passphrase (or the file was altered)") from exc
    try:
        return cbor2.loads(plain)
    except Exception as exc:
        raise KeyFileError(f"{where}: sealed key data is corrupt") from exc
