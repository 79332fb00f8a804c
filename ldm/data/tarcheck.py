"""Is a tar shard whole? Find shards cut short by a copy, download or write that stopped part-way.

Python's ``tarfile`` (and so webdataset) reads a tar that was cut in the middle as a shorter archive: a missing or
partial header block looks like the end of the archive, so the samples after the cut vanish without an error
(webdataset only sometimes raises "unexpected end of data", and then does not say that the shard is short).
A whole archive ends with an end-of-archive marker, a 512-byte block of zeros, right after its last member.
``scan_tar`` walks the member headers, seeking over the data (about 512 bytes read per member), and reports
where the file stops being a whole archive when that marker is missing.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass

from webdataset.tariterators import base_plus_ext

BLOCK = tarfile.BLOCKSIZE  # 512


def sample_key(member_name: str) -> str | None:
    """The webdataset sample key of a member name (``dir/abc.seg.png`` -> ``dir/abc``), as ``group_by_keys``."""
    key, _ = base_plus_ext(member_name)
    return key


@dataclass(frozen=True)
class TarScan:
    """What ``scan_tar`` found.

    ``keys``: the sample keys whose members all lie whole before the cut, in file order (all keys when the
    archive is whole). ``lost_key``: the sample that the cut went through (read in part or not at all; None
    when unknown or when the file is whole). ``cut_at``: byte offset where the archive stops being whole.
    """

    path: str
    size: int
    truncated: bool
    keys: tuple[str, ...]
    lost_key: str | None = None
    cut_at: int | None = None
    detail: str = ""

    @property
    def samples(self) -> int:
        return len(self.keys)

    def describe(self, expected: int | None = None) -> str:
        """One line for a warning or an error: which file, where it was cut, how many samples survive."""
        if not self.truncated:
            return f"{self.path}: a whole tar archive with {self.samples} samples"
        held = (f"it should hold {expected} samples, {expected - self.samples} of them are lost"
                if expected is not None else "the rest of the shard is lost")
        return (f"{self.path} is truncated ({self.size} bytes; {self.detail}): the shard ended early after "
                f"{self.samples} whole samples; {held}. Copy or rewrite the shard (a half-copied or interrupted "
                "download is the usual cause)")


def _partial_header_name(block: bytes) -> str | None:
    """The member name in a header block cut short (the name field is its first 100 bytes)."""
    if len(block) < 100:
        return None
    name = block[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    return None if not name or name.startswith("././@") else name


def scan_tar(path: str | os.PathLike) -> TarScan:
    """Walk the headers of the tar file ``path`` and tell whether it is whole (see the module docstring).

    A file that is not a tar at all (empty, random bytes) is reported as truncated with no samples.
    """
    path = os.fspath(path)
    size = os.path.getsize(path)
    names: list[str] = []
    with open(path, "rb") as fh:
        try:
            tar = tarfile.open(fileobj=fh, mode="r:")
        except tarfile.TarError as exc:
            return TarScan(path, size, True, (), cut_at=0,
                           detail=f"cut inside its first member, or not a tar file: {exc}")
        last = None
        while True:
            try:
                member = tar.next()
            except tarfile.TarError:  # a member's data, or the next header, runs past the end of the file
                break
            if member is None:
                break
            last = member
            if member.isreg():
                names.append(member.name)
        cut_name = None  # a member whose header was read but whose data runs past the end
        end = tar.offset
        if last is not None and last.offset_data + last.size > size:
            cut_name, end = last.name, last.offset
            if names and names[-1] == last.name:
                names.pop()
        fh.seek(end)
        block = fh.read(BLOCK)
    if cut_name is None and len(block) == BLOCK and block == bytes(BLOCK):
        return TarScan(path, size, False, _keys(names))
    if cut_name is not None:
        detail = f"member {cut_name!r} is cut at byte {size} of the file"
    elif not block:
        detail = f"no end-of-archive marker after the last whole member (byte {end})"
        cut_name = None
    else:
        cut_name = _partial_header_name(block)
        detail = (f"the header at byte {end} is cut or damaged"
                  + (f" (member {cut_name!r})" if cut_name else ""))
    keys = _keys(names)
    lost = sample_key(cut_name) if cut_name else None
    if keys and (lost is None or lost == keys[-1]):
        # The cut may have gone through the last sample seen (its later members are missing): drop it too, so
        # that no sample is used without, say, its caption.
        lost = keys[-1]
        keys = keys[:-1]
    return TarScan(path, size, True, keys, lost, end, detail)


def _keys(names: list[str]) -> tuple[str, ...]:
    keys: list[str] = []
    for name in names:
        key = sample_key(name)
        if key is not None and (not keys or keys[-1] != key):
            keys.append(key)
    return tuple(keys)


_SCANS: dict[tuple[str, int, int], TarScan] = {}


def scan_tar_cached(path: str | os.PathLike) -> tuple[TarScan, bool]:
    """``scan_tar`` once per file version (path, size, mtime) in this process; also says whether this call
    scanned it (so that a warning about it is logged once per process, while every pass still counts it)."""
    path = os.fspath(path)
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _SCANS:
        return _SCANS[key], False
    _SCANS[key] = scan = scan_tar(path)
    return scan, True
