import pytest

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
