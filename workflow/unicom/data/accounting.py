"""What a download's counts say: the per-part summary, the success rate and its floor.

A part's summary counts its rows per status (they add up to its input rows) and its failed
rows per error message. The floor (download.min_success_rate) is checked on those counts by
each download job, part after part, and by download_summary on the whole list; a miss is one
line that names the likely cause, read from the error messages.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa

from unicom.errors import UnicomError

SUCCESS = "success"
# Rows deliberately not fetched: they are neither successes nor failures.
NOT_TRIED = frozenset({"duplicate_url"})
# img2dataset's resizer messages (cv2 could not decode, or the image is out of bounds).
RESIZE_MESSAGES = ("image decoding error", "image too small", "image area too large",
                   "aspect ratio too large")  # fmt: skip
HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")
# What the commonest HTTP codes mean for a whole batch.
HTTP_MEANINGS = {
    "4": "the hosts refuse the requests",
    "5": "the hosts fail",
    "401": "the hosts refuse this client",
    "403": "the hosts refuse this client (download.user_agent_token?)",
    "404": "the links are gone (an old URL list?)",
    "410": "the links are gone (an old URL list?)",
    "429": "the hosts rate-limit this client (fewer download.threads)",
}
QUOTED = 120  # characters of an error message quoted in the one line


def summarize(part: str, table: pa.Table, input_rows: int, seconds: float) -> dict[str, Any]:
    """Counts per status and, for the rows tried and failed, per error message; raises if
    the counts do not add up to the input."""
    statuses = table.column("status").to_pylist()
    counts = Counter(status if status is not None else "unknown" for status in statuses)
    errors = Counter(
        message
        for status, message in zip(statuses, table.column("error_message").to_pylist(), strict=True)
        if status != SUCCESS and status not in NOT_TRIED and message is not None
    )
    if sum(counts.values()) != input_rows:
        raise RuntimeError(
            f"part {part}: statuses add up to {sum(counts.values())}, not {input_rows} input rows"
        )
    return {
        "part": part,
        "input_rows": input_rows,
        "counts": dict(sorted(counts.items())),
        "errors": dict(errors.most_common()),
        "seconds": round(seconds, 3),
    }


def tried_rows(counts: Mapping[str, int]) -> int:
    """Rows download tried to fetch: all but the deliberately skipped (a rejected URL scheme
    counts as tried and failed: the list holds URLs the config will not fetch)."""
    return sum(n for status, n in counts.items() if status not in NOT_TRIED)


def success_rate(counts: Mapping[str, int]) -> float | None:
    """Successes over tried rows; None when no row was tried."""
    tried = tried_rows(counts)
    return counts.get(SUCCESS, 0) / tried if tried else None


def error_kind(message: str) -> str:
    """What an error message says went wrong: scheme, empty, timeout, http, robots, decode,
    network or other."""
    lower = message.lower()
    if message.startswith("URL scheme ") or message == "unparsable URL":
        return "scheme"
    if message == "empty URL":
        return "empty"
    if "timed out" in lower or "timeout" in lower:
        return "timeout"
    if HTTP_ERROR.search(message):
        return "http"
    if "x-robots-tag" in lower:
        return "robots"
    if lower.startswith(RESIZE_MESSAGES) or "decod" in lower or "opencv" in lower:
        return "decode"
    if "urlopen error" in lower or "errno" in lower or "connection" in lower:
        return "network"
    return "other"


def quoted(message: str) -> str:
    text = " ".join(message.split())
    return repr(text if len(text) <= QUOTED else text[: QUOTED - 3] + "...")


def http_cause(rows: int, errors: Mapping[str, int]) -> str:
    codes: Counter[str] = Counter()
    for message, n in errors.items():
        match = HTTP_ERROR.search(message)
        if match:
            codes[match.group(1)] += n
    code, n = codes.most_common(1)[0]
    meaning = HTTP_MEANINGS.get(code) or HTTP_MEANINGS.get(code[0])
    cause = f"{rows} HTTP errors, commonest HTTP {code} ({n} rows)"
    return f"{cause}: {meaning}" if meaning else cause


def likely_cause(counts: Mapping[str, int], errors: Mapping[str, int]) -> str:
    """The likely cause of the failures, from the error messages (or the statuses, where the
    rows have none): the kind of error that most failed rows share, with its config key."""
    kinds: Counter[str] = Counter()
    for message, n in errors.items():
        kinds[error_kind(message)] += n
    if not kinds:
        failed = {s: n for s, n in counts.items() if s != SUCCESS and s not in NOT_TRIED}
        status, n = Counter(failed).most_common(1)[0]
        return f"{n} rows {status}, without an error message"
    kind, rows = kinds.most_common(1)[0]
    of_kind = {m: n for m, n in errors.items() if error_kind(m) == kind}
    commonest = max(of_kind, key=of_kind.__getitem__)
    if kind == "scheme":
        return f"{rows} rows not fetched: {commonest} (set download.allowed_schemes)"
    if kind == "http":
        return http_cause(rows, of_kind)
    return {
        "empty": f"{rows} rows have an empty URL (is data.url_col the URL column?)",
        "timeout": f"{rows} downloads timed out ({quoted(commonest)}): a slow or blocked "
        "network or proxy, or download.timeout too short",
        "robots": f"{rows} images opted out by X-Robots-Tag "
        "(download.disallowed_header_directives)",
        "decode": f"{rows} images did not decode or resize ({quoted(commonest)}): not images, "
        "or download.min_image_size and the image settings",
        "network": f"{rows} downloads could not connect ({quoted(commonest)}): no network, "
        "DNS or proxy here?",
    }.get(kind, f"{rows} failures, commonest {quoted(commonest)}")


def check_success_rate(
    counts: Mapping[str, int], errors: Mapping[str, int], floor: float | None, where: str
) -> None:
    """One line naming the likely cause when the tried rows' success rate is below ``floor``
    (None or 0: no floor; no row tried: nothing to judge)."""
    rate = success_rate(counts)
    if not floor or rate is None or rate >= floor:
        return
    raise UnicomError(
        f"{where}: {counts.get(SUCCESS, 0)} of {tried_rows(counts)} rows downloaded "
        f"({100 * rate:.1f} %), below download.min_success_rate {floor:g}; likely cause: "
        f"{likely_cause(counts, errors)}"
    )


def check_parts(summaries: Sequence[Mapping[str, Any]], floor: float | None) -> None:
    """The floor on the parts a download job has fetched so far (their summaries)."""
    counts, errors = totals(summaries)
    names = [s["part"] for s in summaries]
    where = f"download part {names[0]}"
    if len(names) > 1:
        where = f"download parts {names[0]}-{names[-1]}"
    check_success_rate(counts, errors, floor, where)


def totals(summaries: Iterable[Mapping[str, Any]]) -> tuple[Counter[str], Counter[str]]:
    """Counts per status and per error message, summed over part summaries."""
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    for summary in summaries:
        counts.update(summary["counts"])
        errors.update(summary.get("errors", {}))
    return counts, errors
