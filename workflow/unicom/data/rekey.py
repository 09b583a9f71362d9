"""img2dataset's tar -> the shard the pipeline reads: every member renamed from img2dataset's
per-call key to the global key of its input row, members in row order.

Random access to the source tar (headers first, then the data in row order), so this is
``tarfile``, not the streaming reader of ``unicom.shards``.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Mapping, Sequence

from tqdm import tqdm


def member_key(name: str) -> tuple[str, str]:
    """webdataset member name -> (key, extension): the key ends at the first dot."""
    key, dot, extension = name.partition(".")
    if not dot or "/" in name:
        raise RuntimeError(f"unexpected member {name!r} in img2dataset's tar")
    return key, extension


def rewrite_tar_keys(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    new_keys: Mapping[str, str],
    drop_json_fields: Sequence[str] = (),
) -> set[str]:
    """Copy ``src`` into ``dst`` renaming each member's key via ``new_keys``; return the keys.

    Members are written in the order of their new keys (the input rows): img2dataset's threads
    write samples as downloads finish, and an order that changes from run to run would change
    the embeddings' row order, the k-means sample and everything after it. The ``.json``
    member's ``key`` field is rewritten too (and ``drop_json_fields`` removed), so metadata and
    member names agree.
    """
    written: set[str] = set()
    with tarfile.open(src, "r:") as source, tarfile.open(dst, "w") as target:
        members = []
        for member in source.getmembers():  # headers only: the data is read below, in order
            if not member.isfile():
                continue
            key, extension = member_key(member.name)
            if key not in new_keys:
                raise RuntimeError(f"tar member {member.name!r} has no row in img2dataset's table")
            members.append((new_keys[key], extension, member))
        members.sort(key=lambda item: item[:2])
        for new_key, extension, member in tqdm(
            members, unit="file", desc="rewrite tar", mininterval=5
        ):
            info = tarfile.TarInfo(f"{new_key}.{extension}")
            info.mtime, info.mode = member.mtime, member.mode
            data = source.extractfile(member)
            if extension == "json":
                meta = json.loads(data.read())
                meta["key"] = new_key
                for field in drop_json_fields:
                    meta.pop(field, None)
                payload = json.dumps(meta, indent=4).encode()
                info.size = len(payload)
                target.addfile(info, _BytesReader(payload))
            else:
                info.size = member.size
                target.addfile(info, data)
            written.add(new_key)
    return written


class _BytesReader:
    """Minimal file object over bytes for tarfile.addfile."""

    def __init__(self, payload: bytes) -> None:
        self._payload, self._offset = payload, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._payload) if size < 0 else self._offset + size
        chunk = self._payload[self._offset : end]
        self._offset += len(chunk)
        return chunk
