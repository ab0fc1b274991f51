"""dm-verity hash trees (format version 1, SHA-256, 4 KiB blocks), built in Python at image build time.

Why: the root image used to be copied from the medium into RAM and hashed whole before boot (about 3 s of every
boot under TCG, and 40 MB of RAM for the life of the appliance).  With dm-verity the kernel checks each 4 KiB block
against this tree when it is read, so boot reads only what it uses and a changed block is an I/O error, never data.
The initramfs carries the root hash (:class:`Verity` ``table_params``), so an image and its tree can only be
swapped together with the initramfs that names them.

Layout, as drivers/md/dm-verity-target.c (6.1) reads it with ``hash_start`` 0: level 0 hashes the data blocks,
level i+1 hashes level i's hash blocks, until one block remains; 128 digests per hash block, zero-padded; the levels
are stored top level first.  A digest is ``SHA-256(salt || block)`` (version 1 puts the salt first).  The root hash
is the digest of the top level's one block (of the one data block when the image is a single block).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Final, Self

BLOCK: Final = 4096
DIGEST: Final = 32  # SHA-256
PER_BLOCK: Final = BLOCK // DIGEST  # 128 digests in one hash block
ALGORITHM: Final = "sha256"
VERSION: Final = 1


@dataclass(frozen=True)
class Verity:
    """What the kernel needs besides the two devices: the table's numbers and the root hash."""

    data_blocks: int
    hash_blocks: int
    root_hash: str  # hex
    salt: str  # hex
    image_sha256: str  # the whole image's, so a stale tree is noticed at build time

    def initramfs_line(self) -> bytes:
        """/etc/nullbox/rootfs.verity: what /init's nb_verity_open passes to the kernel (with the devices)."""
        return f"{self.data_blocks} {self.hash_blocks} {self.root_hash} {self.salt}\n".encode()

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls(**json.loads(text))


def level_sizes(data_blocks: int) -> list[int]:
    """Hash blocks per level, level 0 (over the data) first — the kernel's own arithmetic."""
    if data_blocks < 1:
        raise ValueError("a verity image needs at least one data block")
    sizes: list[int] = []
    count = data_blocks
    while count > 1:
        count = -(-count // PER_BLOCK)
        sizes.append(count)
    return sizes


def _digest(salt: bytes, block: bytes) -> bytes:
    h = hashlib.sha256(salt)
    h.update(block)
    return h.digest()


def _blocks(stream: BinaryIO, what: str) -> Iterator[bytes]:
    while block := stream.read(BLOCK):
        if len(block) != BLOCK:
            raise ValueError(f"{what} is not a whole number of {BLOCK}-byte blocks (pad it: mksquashfs does)")
        yield block


def _pack(digests: list[bytes]) -> list[bytes]:
    """Digests into hash blocks, 128 per block, the last one zero-padded."""
    out = []
    for start in range(0, len(digests), PER_BLOCK):
        out.append(b"".join(digests[start : start + PER_BLOCK]).ljust(BLOCK, b"\0"))
    return out


def build_tree(image: Path, tree: Path, salt: bytes | None = None) -> Verity:
    """Write ``image``'s hash tree to ``tree``; return the table's numbers and the root hash.

    Without ``salt``, :func:`salt_for` the image's SHA-256 (computed in the same pass).
    """
    whole = hashlib.sha256()
    with image.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            whole.update(chunk)
    if salt is None:
        salt = salt_for(whole.hexdigest())
    with image.open("rb") as stream:
        digests = [_digest(salt, block) for block in _blocks(stream, str(image))]
    if not digests:
        raise ValueError(f"{image} is empty")
    data_blocks = len(digests)
    levels: list[list[bytes]] = []
    while len(digests) > 1:
        blocks = _pack(digests)
        levels.append(blocks)
        digests = [_digest(salt, block) for block in blocks]
    if [len(level) for level in levels] != level_sizes(data_blocks):
        raise AssertionError("hash tree levels differ from the kernel's arithmetic")  # a bug here, not bad input
    with tree.open("wb") as out:
        for level in reversed(levels):  # the top level first
            for block in level:
                out.write(block)
    hash_blocks = sum(len(level) for level in levels)
    return Verity(data_blocks, hash_blocks, digests[0].hex(), salt.hex(), whole.hexdigest())


def salt_for(image_sha256: str) -> bytes:
    """A salt derived from the image itself: reproducible builds, and still a different salt for every image."""
    return hashlib.sha256(b"nullbox dm-verity salt\0" + bytes.fromhex(image_sha256)).digest()


def check_block(image: Path, tree: Path, verity: Verity, index: int) -> bool:
    """Whether data block ``index`` verifies up to the root hash, as the kernel would check it (tests use this)."""
    salt = bytes.fromhex(verity.salt)
    sizes = level_sizes(verity.data_blocks)
    starts = {}
    position = 0
    for level in reversed(range(len(sizes))):
        starts[level] = position
        position += sizes[level]
    with image.open("rb") as data, tree.open("rb") as hashes:
        data.seek(index * BLOCK)
        digest = _digest(salt, data.read(BLOCK))
        position = index
        for level in range(len(sizes)):
            hashes.seek((starts[level] + position // PER_BLOCK) * BLOCK)
            block = hashes.read(BLOCK)
            slot = position % PER_BLOCK
            if block[slot * DIGEST : (slot + 1) * DIGEST] != digest:
                return False
            digest = _digest(salt, block)
            position //= PER_BLOCK
    return digest.hex() == verity.root_hash
