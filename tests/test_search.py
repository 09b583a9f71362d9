import json

import pytest

from unicom.cli import run_cli
from unicom.tools.search import main

EMBED = json.dumps({"encoder": "demo", "demo": {"image_size": 64}})


def test_query_finds_itself_first_and_draws_a_strip(small_image_folder, tmp_path, capsys):
    query = sorted(small_image_folder.rglob("boats_*.png"))[3]
    out = tmp_path / "strip.png"
    main(
        [
            "--model",
            "base",
            "--embed-options-json",
            EMBED,
            "--index",
            str(small_image_folder),
            "--query",
            str(query),
            "--top",
            "4",
            "--out",
            str(out),
        ]
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    rank, score, name = lines[0].split()
    assert name == str(query) and float(score) == pytest.approx(1.0, abs=1e-3)
    assert all("boats_" in line for line in lines[:2])  # its own category comes next
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_missing_index_is_one_line(small_image_folder, tmp_path, capsys):
    query = str(next(small_image_folder.rglob("*.png")))
    with pytest.raises(SystemExit):
        run_cli(
            main,
            [
                "--model",
                "base",
                "--embed-options-json",
                EMBED,
                "--index",
                str(tmp_path / "nowhere"),
                "--query",
                query,
            ],
        )
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert errors == [
        f"unicom: error: --index: {tmp_path / 'nowhere'} is neither an image, "
        "a folder nor a .tar shard"
    ]
