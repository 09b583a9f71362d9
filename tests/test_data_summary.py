import json

import pytest

from unicom.cli import run_cli
from unicom.data import summary
from unicom.data.accounting import check_success_rate, likely_cause, success_rate, tried_rows
from unicom.data.summary import combine_summaries, part_summaries, summary_table
from unicom.errors import UnicomError

PARTS = [
    {
        "part": "00000",
        "input_rows": 5,
        "counts": {"success": 3, "failed_to_download": 2},
        "errors": {"HTTP Error 404: Not Found": 2},
    },
    {
        "part": "00001",
        "input_rows": 4,
        "counts": {"success": 3, "rejected_scheme": 1},
        "errors": {"scheme 'ftp' not allowed": 1},
    },
]


def test_counts_are_summed_and_checked_against_the_url_list():
    combined = combine_summaries(PARTS, expected_rows=9)
    assert combined["counts"] == {"failed_to_download": 2, "rejected_scheme": 1, "success": 6}
    assert combined["input_rows"] == 9 and combined["parts"] == 2
    assert combined["success_rate"] == pytest.approx(6 / 9)


def test_a_part_that_does_not_add_up_is_refused():
    broken = [dict(PARTS[0], counts={"success": 3})]
    with pytest.raises(
        UnicomError, match="part 00000: counts add up to 3, not to its 5 input rows"
    ):
        combine_summaries(broken, expected_rows=5)


def test_missing_rows_across_parts_are_refused():
    with pytest.raises(UnicomError, match="account for 9 rows but the URL list has 10"):
        combine_summaries(PARTS, expected_rows=10)


def test_table_has_one_line_per_part_and_a_column_per_status():
    lines = summary_table(PARTS).splitlines()
    assert lines[0] == "part,input_rows,failed_to_download,rejected_scheme,success"
    assert lines[1:] == ["00000,5,2,0,3", "00001,4,0,1,3"]


def test_every_part_of_the_manifest_is_summarized_exactly_once():
    jobs = [{"parts": PARTS[:1]}, {"parts": PARTS[1:]}]
    assert part_summaries(jobs, ["00000", "00001"]) == PARTS
    with pytest.raises(UnicomError, match="part\\(s\\) 00002 missing"):
        part_summaries(jobs, ["00000", "00001", "00002"])
    with pytest.raises(UnicomError, match="00001 twice"):
        part_summaries([*jobs, {"parts": PARTS[1:]}], ["00000", "00001"])
    with pytest.raises(UnicomError, match="00001 not in the manifest"):
        part_summaries(jobs, ["00000"])


# --------------------------------------------------------------------------- the floor


def test_the_rate_is_over_the_rows_tried():
    # a repeated URL is skipped on purpose; a rejected scheme was tried and failed
    counts = {"success": 6, "duplicate_url": 4, "rejected_scheme": 1, "failed_to_download": 1}
    assert tried_rows(counts) == 8
    assert success_rate(counts) == pytest.approx(6 / 8)
    assert success_rate({"duplicate_url": 3}) is None  # nothing tried: nothing to judge
    assert success_rate({"rejected_scheme": 2}) == 0.0


@pytest.mark.parametrize(
    ("errors", "cause"),
    [
        (
            {"URL scheme 'http' not in download.allowed_schemes ['ftp']": 7, "empty URL": 1},
            "7 rows not fetched: URL scheme 'http' not in download.allowed_schemes ['ftp'] "
            "(set download.allowed_schemes)",
        ),
        ({"empty URL": 8}, "8 rows have an empty URL (is data.url_col the URL column?)"),
        (
            {"timed out": 5, "<urlopen error timed out>": 2, "HTTP Error 404: Not Found": 1},
            "7 downloads timed out ('timed out'): a slow or blocked network or proxy, "
            "or download.timeout too short",
        ),
        (
            {"HTTP Error 404: Not Found": 3, "HTTP Error 403: Forbidden": 4, "timed out": 1},
            "7 HTTP errors, commonest HTTP 403 (4 rows): the hosts refuse this client "
            "(download.user_agent_token?)",
        ),
        (
            {"HTTP Error 429: Too Many Requests": 8},
            "8 HTTP errors, commonest HTTP 429 (8 rows): the hosts rate-limit this client "
            "(fewer download.threads)",
        ),
        (
            {"HTTP Error 502: Bad Gateway": 8},
            "8 HTTP errors, commonest HTTP 502 (8 rows): the hosts fail",
        ),  # fmt: skip
        (
            {"Image decoding error": 5, "image too small": 2, "timed out": 1},
            "7 images did not decode or resize ('Image decoding error'): not images, "
            "or download.min_image_size and the image settings",
        ),
        (
            {"<urlopen error [Errno -2] Name or service not known>": 6, "timed out": 2},
            "6 downloads could not connect ('<urlopen error [Errno -2] Name or service not "
            "known>'): no network, DNS or proxy here?",
        ),
        (
            {"Use of image disallowed by X-Robots-Tag directive": 8},
            "8 images opted out by X-Robots-Tag (download.disallowed_header_directives)",
        ),
        ({"something new\non two lines": 8}, "8 failures, commonest 'something new on two lines'"),
    ],
)
def test_the_likely_cause_is_the_kind_most_failures_share(errors, cause):
    counts = {"success": 0, "failed_to_download": sum(errors.values())}
    assert likely_cause(counts, errors) == cause


def test_failures_without_a_message_are_named_by_status():
    assert (
        likely_cause({"success": 1, "unknown": 5}, {}) == "5 rows unknown, without an error message"
    )


def test_below_the_floor_is_one_line_with_the_numbers_and_the_cause():
    counts = {"success": 1, "failed_to_download": 9, "duplicate_url": 90}
    errors = {"timed out": 9}
    check_success_rate(counts, errors, None, "x")  # no floor
    check_success_rate(counts, errors, 0, "x")  # turned off
    check_success_rate(counts, errors, 0.1, "x")  # exactly at the floor: passes
    with pytest.raises(UnicomError) as info:
        check_success_rate(counts, errors, 0.2, "download part 00003")
    assert str(info.value) == (
        "download part 00003: 1 of 10 rows downloaded (10.0 %), below "
        "download.min_success_rate 0.2; likely cause: 9 downloads timed out ('timed out'): "
        "a slow or blocked network or proxy, or download.timeout too short"
    )


def test_the_whole_list_is_checked_before_its_summary_is_written(tmp_path, capsys):
    """download_summary: one line and exit status 2 below the floor; no summary for k-means."""
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    (parts_dir / "manifest.json").write_text(
        json.dumps({"parts": ["00000", "00001"], "total_rows": 9, "shards_per_job": 1})
    )
    for index, part in enumerate(PARTS):
        (tmp_path / f"{part['part']}.summary.json").write_text(
            json.dumps({"parts": [PARTS[index]]})
        )
    args = ["--parts-dir", str(parts_dir), "--out", str(tmp_path / "summary.json"),
            "--out-table", str(tmp_path / "summary.csv"), str(tmp_path / "{batch}.summary.json")]  # fmt: skip
    run_cli(summary.main, [*args, "--min-success-rate", "0.6"])  # 6 of 9: above
    assert json.loads((tmp_path / "summary.json").read_text())["counts"]["success"] == 6
    (tmp_path / "summary.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(summary.main, [*args, "--min-success-rate", "0.7"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        "unicom: error: download (the whole URL list): 6 of 9 rows downloaded (66.7 %), below "
        "download.min_success_rate 0.7; likely cause: 2 HTTP errors, commonest HTTP 404 "
        "(2 rows): the links are gone (an old URL list?)"
    )
    assert not (tmp_path / "summary.json").exists()
