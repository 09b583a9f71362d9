"""The one reader of webdataset shards (tars written by img2dataset): members streamed in
archive order by the ``webdataset`` package, grouped into samples by key; and the writer of
shards in the same layout (``{key}.jpg`` / ``.txt`` / ``.json``) for labelled splits and tests.

The grouping is ours: webdataset's ``group_by_keys`` starts a second sample when a key comes
back later in the tar, which the joins on ``key`` downstream could not tell apart, so here that
is an error; and a member without an extension is kept (webdataset drops it silently).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from PIL import Image

from unicom.errors import UnicomError
from unicom.formats import IMAGE_EXTENSIONS
from unicom.io import atomic_path


@dataclass(frozen=True)
class TarSample:
    """The members of one webdataset sample: extension (lower case) -> bytes."""

    key: str
    files: dict[str, bytes]


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset naming: ``dir/key.ext.more`` -> (``dir/key``, ``ext.more``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, extension.lower() if dot else ""


def group_tar_members(
    members: Iterable[tuple[str, bytes]], source: str = "tar"
) -> Iterator[TarSample]:
    """Group consecutive ``(member name, bytes)`` pairs sharing a key into samples.

    webdataset stores a sample's files next to each other; a key that comes back later
    would be a second sample with the same key, which downstream joins cannot tell apart.
    """
    seen: set[str] = set()
    current_key: str | None = None
    current: dict[str, bytes] = {}
    for name, data in members:
        key, extension = split_member_name(name)
        if key != current_key:
            if current_key is not None:
                yield TarSample(current_key, current)
            if key in seen:
                raise UnicomError(f"{source}: key {key!r} appears twice (members not contiguous)")
            seen.add(key)
            current_key, current = key, {}
        if extension in current:
            raise UnicomError(f"{source}: sample {key!r} has two '.{extension}' members")
        current[extension] = data
    if current_key is not None:
        yield TarSample(current_key, current)


def iter_tar_members(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """Stream ``(name, bytes)`` of the regular files of a tar, in archive order."""
    # webdataset imports torch (~3 s): only the stages that stream tars pay for it.
    from webdataset.tariterators import tar_file_iterator

    try:
        with open(path, "rb") as stream:
            for member in tar_file_iterator(stream, skip_meta=None):
                yield member["fname"], member["data"]
    except (tarfile.TarError, EOFError, OSError) as err:
        # webdataset appends " @ <file object>" to the errors it passes on
        reason = str(err).split(" @ <")[0]
        raise UnicomError(f"{path}: not a readable tar shard ({reason})") from None


def iter_samples(path: str | os.PathLike) -> Iterator[TarSample]:
    """The samples of a shard, in archive order."""
    return group_tar_members(iter_tar_members(path), str(path))


def sample_image(sample: TarSample) -> tuple[str, bytes] | None:
    """(extension, bytes) of the sample's image (``IMAGE_EXTENSIONS`` order), or None."""
    extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample.files), None)
    return None if extension is None else (extension, sample.files[extension])


def read_samples(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, TarSample]:
    """The samples of ``keys`` from one shard (one pass); a key not in it is an error."""
    wanted = set(keys)
    found = {s.key: s for s in iter_samples(path) if s.key in wanted}
    missing = [key for key in keys if key not in found]
    if missing:
        raise UnicomError(f"{path}: no sample with key {missing[0]!r} ({len(missing)} missing)")
    return found


def scan_tar_samples(path: str | os.PathLike) -> int | None:
    """Count the samples of an uncompressed tar from its headers alone (seeks, no data read).

    Run before the workers start: a truncated or corrupt shard fails here, with one clear
    error, instead of inside a worker. Returns None for a compressed tar (not scanned).
    """
    try:
        archive = tarfile.open(path, mode="r:")
    except (tarfile.TarError, EOFError):
        return None  # compressed, or not a tar at all: iter_tar_members reports the latter
    except OSError as err:
        raise UnicomError(f"{path}: cannot read the shard ({err})") from None
    try:
        with archive:
            names = [member.name for member in archive if member.isfile()]
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UnicomError(f"{path}: not a readable tar shard ({err})") from None
    return sum(1 for _ in group_tar_members(((name, b"") for name in names), str(path)))


# --------------------------------------------------------------------------- writing


def image_bytes(
    image: Image.Image | tuple[int, ...],
    fmt: str = "JPEG",
    size: tuple[int, int] = (48, 40),
    mode: str = "RGB",
    quality: int = 90,
) -> bytes:
    """An encoded image: ``image`` itself, or a plain one of colour ``image``."""
    if not isinstance(image, Image.Image):
        image = Image.new(mode, size, tuple(image))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def sample_members(
    key: str,
    image: bytes | None,
    caption: str,
    meta: Mapping[str, object] | None = None,
    extension: str = "jpg",
) -> list[tuple[str, bytes]]:
    """The members of one img2dataset sample: image, ``.txt`` caption, ``.json`` metadata."""
    members = [] if image is None else [(f"{key}.{extension}", image)]
    members.append((f"{key}.txt", caption.encode()))
    if meta is not None:
        members.append((f"{key}.json", json.dumps(dict(meta)).encode()))
    return members


def write_tar(path: str | os.PathLike, members: Iterable[tuple[str, bytes]]) -> None:
    """A tar of ``(name, bytes)`` members in the given order (written atomically)."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
