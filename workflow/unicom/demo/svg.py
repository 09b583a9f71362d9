"""SVG metadata -> captions: the work's ``dc:title`` and ``dc:subject`` keywords, read only up to
the end of ``<metadata>`` (openclipart drawings can be megabytes), turned into one caption."""

from __future__ import annotations

import html
import logging
import re
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger("unicom.demo.svg")

# openclipart's curation placeholder, not a description of the picture.
PLACEHOLDER_TAGS = frozenset({"unsorted"})
# A title on this many pictures or more names a collection (e.g. 'Lemon SVG theme').
GENERIC_TITLE_MIN_SHARE = 5


# --------------------------------------------------------------------------- SVG metadata


def _local(tag: str) -> str:
    """'{namespace}title' -> 'title'."""
    return tag.rsplit("}", 1)[-1]


def _clean_text(text: str | None) -> str:
    # Some files escape entities twice (&amp;quot;), so unescape once more after XML parsing.
    return " ".join(html.unescape(text or "").split())


def _metadata_from_events(parser: ET.XMLPullParser, state: dict) -> bool:
    """Consume parser events into ``state``; True once </metadata> has been seen."""
    for event, elem in parser.read_events():
        name = _local(elem.tag)
        if event == "start":
            state["stack"].append(name)
            continue
        state["stack"].pop()
        stack = state["stack"]
        if name == "metadata":
            return True
        if "metadata" not in stack:
            continue
        if name == "title" and state["title"] is None and "Agent" not in stack:
            state["title"] = _clean_text(elem.text)
        elif name == "li" and "subject" in stack:
            state["tags"].append(_clean_text(elem.text))
        elif name == "subject" and len(elem) == 0 and elem.text and elem.text.strip():
            # Plain <dc:subject>a, b</dc:subject> without an rdf:Bag.
            state["tags"].extend(_clean_text(t) for t in elem.text.split(","))
    return False


_AGENT_RE = re.compile(r"<(\w+:)?Agent\b.*?</(\w+:)?Agent>", re.S)
_TITLE_RE = re.compile(r"<(?:\w+:)?title\b[^>]*>(.*?)</(?:\w+:)?title>", re.S)
_SUBJECT_RE = re.compile(r"<(?:\w+:)?subject\b[^>]*>(.*?)</(?:\w+:)?subject>", re.S)
_LI_RE = re.compile(r"<(?:\w+:)?li\b[^>]*>(.*?)</(?:\w+:)?li>", re.S)
_TAG_RE = re.compile(r"<[^>]*>")


_METADATA_START_RE = re.compile(r"<(?:\w+:)?metadata\b")
_METADATA_END_RE = re.compile(r"</(?:\w+:)?metadata\s*>")
_METADATA_END_BYTES_RE = re.compile(rb"</(?:\w+:)?metadata\s*>")


def _metadata_by_regex(text: str) -> tuple[str, list[str]]:
    """Best-effort fallback for SVGs that are not well-formed XML."""
    start = _METADATA_START_RE.search(text)
    if start is None:
        return "", []
    end = _METADATA_END_RE.search(text, start.end())
    block = text[start.end() : end.start() if end else len(text)]
    without_agents = _AGENT_RE.sub("", block)
    title_match = _TITLE_RE.search(without_agents)
    title = _clean_text(_TAG_RE.sub("", title_match.group(1))) if title_match else ""
    tags: list[str] = []
    subject = _SUBJECT_RE.search(block)
    if subject:
        items = _LI_RE.findall(subject.group(1)) or subject.group(1).split(",")
        tags = [_clean_text(_TAG_RE.sub("", item)) for item in items]
    return title, tags


def _metadata_from_chunks(chunks: Iterable[bytes | str]) -> tuple[str, list[str]]:
    """Parse chunks until </metadata>, so the (large) drawing after it is never read."""
    parser = ET.XMLPullParser(events=("start", "end"))
    state: dict = {"stack": [], "title": None, "tags": []}
    chunks = iter(chunks)
    seen: list[bytes] = []
    try:
        for chunk in chunks:
            seen.append(chunk if isinstance(chunk, bytes) else chunk.encode())
            parser.feed(chunk)
            if _metadata_from_events(parser, state):
                break
        else:
            parser.close()
            _metadata_from_events(parser, state)
    except ET.ParseError:
        # Read on to the end of the metadata (or of the file), then scan the text.
        while (
            not _METADATA_END_BYTES_RE.search(b"".join(seen[-2:]))
            and (chunk := next(chunks, None)) is not None
        ):
            seen.append(chunk if isinstance(chunk, bytes) else chunk.encode())
        return _metadata_by_regex(b"".join(seen).decode("utf-8", errors="replace"))
    return state["title"] or "", state["tags"]


def parse_svg_metadata(data: bytes | str) -> tuple[str, list[str]]:
    """SVG text -> (dc:title of the work, raw keyword tags from dc:subject).

    The title is the first ``dc:title`` inside ``<metadata>`` that is not an agent's name
    (publisher/creator/rights). Malformed XML falls back to a regex scan; a file without
    metadata gives ``("", [])``. Never raises on bad content.
    """
    return _metadata_from_chunks([data])


def _file_chunks(path: Path, chunk_size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def read_svg_metadata(path: Path, chunk_size: int = 16384) -> tuple[str, list[str]]:
    """Like ``parse_svg_metadata`` but reads the file only up to the end of its metadata."""
    try:
        return _metadata_from_chunks(_file_chunks(path, chunk_size))
    except OSError as err:
        log.debug("cannot read %s: %s", path, err)
        return "", []


# --------------------------------------------------------------------------- captions


def words_from_stem(stem: str) -> str:
    """'chemistry_flask_matthew__02' -> 'chemistry flask matthew' (numbering dropped)."""
    words = [w for w in re.split(r"[\s_\-.]+", stem) if w and not w.isdigit()]
    return " ".join(words) if words else stem.strip()


def normalize_tags(tags: Iterable[str], title: str = "") -> list[str]:
    """Readable, unique, non-empty tags; a tag repeating the title adds nothing."""
    seen = {title.casefold()} if title else set()
    result = []
    for tag in tags:
        tag = " ".join(tag.replace("_", " ").split())
        key = tag.casefold()
        if not tag or key in seen or key in PLACEHOLDER_TAGS:
            continue
        seen.add(key)
        result.append(tag)
    return result


def build_caption(title: str, tags: Iterable[str], stem: str, generic_title: bool = False) -> str:
    """'scale' + ['', 'tool', 'mass', 'scale', 'work'] -> 'scale: tool, mass, work'.

    Without a title, words from the file name stand in for it. A ``generic_title`` (a
    collection name shared by many pictures, e.g. 'Lemon SVG theme') says little about this
    picture, so the file name's words lead and the title follows in brackets.
    """
    title = _clean_text(title)
    head = title or words_from_stem(stem)
    if title and generic_title:
        named = words_from_stem(stem)
        head = title if named.casefold() == title.casefold() else f"{named} ({title})"
    kept = normalize_tags(tags, title or head)
    return f"{head}: {', '.join(kept)}" if kept else head


def generic_titles(titles: Iterable[str], min_share: int) -> set[str]:
    """Titles carried by at least ``min_share`` pictures: collection names, not descriptions."""
    counts = Counter(t for t in titles if t)
    return {t for t, n in counts.items() if n >= min_share}
