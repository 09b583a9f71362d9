"""Tests of the offline demo pool: SVG captions, seeded splits, and the fetch / pool commands."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unicom.demo.build import main
from unicom.demo.debian import FASHION_MNIST_FILES, deb_version, fetch_sources
from unicom.demo.pool import image_header_problem
from unicom.demo.sampling import (
    heldout_count,
    proportional_quotas,
    stratified_cap,
    stratified_heldout_mask,
)
from unicom.demo.svg import (
    build_caption,
    generic_titles,
    parse_svg_metadata,
    read_svg_metadata,
    words_from_stem,
)
from unicom.errors import UnicomError

from helpers import REPO


def svg_text(title: str, tags: list[str], tail: str = "<rect width='1' height='1'/></svg>") -> str:
    items = "".join(f"<rdf:li>{t}</rdf:li>" for t in tags)
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"'
        ' xmlns:dc="http://purl.org/dc/elements/1.1/"'
        ' xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        "<metadata><rdf:RDF><cc:Work rdf:about=''>"
        f"<dc:title>{title}</dc:title>"
        f"<dc:subject><rdf:Bag>{items}</rdf:Bag></dc:subject>"
        "<dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent>"
        "</dc:publisher></cc:Work></rdf:RDF></metadata>" + tail
    )


# --------------------------------------------------------------------------- SVG metadata


def test_parse_svg_metadata_reads_work_title_and_tags_not_agent_title():
    title, tags = parse_svg_metadata(svg_text("scale", ["", "tool", "mass", "scale", "work"]))
    assert title == "scale"
    assert tags == ["", "tool", "mass", "scale", "work"]


def test_parse_svg_metadata_accepts_bytes_and_unescapes_double_escaped_entities():
    title, tags = parse_svg_metadata(svg_text("Fish &amp;amp; Chips", ["food"]).encode())
    assert title == "Fish & Chips"
    assert tags == ["food"]


def test_parse_svg_metadata_stops_after_metadata():
    # Broken XML after </metadata> is never reached, so the strict parse still succeeds.
    title, tags = parse_svg_metadata(svg_text("flask", ["chemistry"], tail="<g><<< not xml"))
    assert (title, tags) == ("flask", ["chemistry"])


def test_parse_svg_metadata_malformed_metadata_falls_back_to_regex():
    # Unbound prefix 'dc' and a stray '&' make this invalid XML.
    text = (
        "<svg><metadata><cc:Work><dc:title>Red & Blue</dc:title>"
        "<dc:subject><rdf:Bag><rdf:li>color</rdf:li><rdf:li>paint</rdf:li></rdf:Bag>"
        "</dc:subject><dc:creator><cc:Agent><dc:title>Someone</dc:title></cc:Agent>"
        "</dc:creator></cc:Work></metadata><path d='M0 0'/></svg>"
    )
    assert parse_svg_metadata(text) == ("Red & Blue", ["color", "paint"])


@pytest.mark.parametrize(
    "text", ["", "not xml at all", b"\x89PNG\r\n\x1a\n\x00\x00", "<svg><path d='M0 0'/></svg>"]
)
def test_parse_svg_metadata_never_raises_on_junk(text):
    assert parse_svg_metadata(text) == ("", [])


def test_read_svg_metadata_missing_file_is_empty(tmp_path):
    assert read_svg_metadata(tmp_path / "absent.svg") == ("", [])


def test_read_svg_metadata_small_chunks_match_whole_text(tmp_path):
    path = tmp_path / "a.svg"
    path.write_text(svg_text("Chemistry Flask", ["chemistry", "science"]))
    assert read_svg_metadata(path, chunk_size=7) == (
        "Chemistry Flask",
        ["chemistry", "science"],
    )


# --------------------------------------------------------------------------- captions


def test_build_caption_dedups_tags_and_drops_empty_and_title():
    tags = ["", "tool", "mass", "scale", "Tool", " work ", "unsorted"]
    assert build_caption("scale", tags, "scale_01") == "scale: tool, mass, work"


def test_build_caption_without_title_uses_file_name_words():
    assert build_caption("", [], "chemistry_flask_matthew__02") == "chemistry flask matthew"
    assert build_caption("  ", ["lab", "flask"], "chemistry_flask_matthew__02") == (
        "chemistry flask matthew: lab, flask"
    )


def test_build_caption_makes_tags_readable():
    assert build_caption("Lemon", ["lemon_theme_icon", "signs_and_symbols"], "x") == (
        "Lemon: lemon theme icon, signs and symbols"
    )


def test_build_caption_generic_title_puts_file_name_first():
    caption = build_caption("Lemon SVG theme", ["icons"], "folder_sound", generic_title=True)
    assert caption == "folder sound (Lemon SVG theme): icons"


def test_generic_titles_counts_shared_titles_only():
    titles = ["theme"] * 5 + ["flask"] * 4 + [""] * 9
    assert generic_titles(titles, 5) == {"theme"}


@pytest.mark.parametrize(
    ("stem", "words"),
    [
        ("chemistry_flask_matthew__02", "chemistry flask matthew"),
        ("a-b.c 7", "a b c"),
        ("02", "02"),
    ],
)
def test_words_from_stem(stem, words):
    assert words_from_stem(stem) == words


# --------------------------------------------------------------------------- sampling


def categories_of(sizes: dict[str, int]) -> list[str]:
    # Interleaved, so the masks must work on positions rather than contiguous blocks.
    names = [c for c, n in sizes.items() for _ in range(n)]
    return list(np.random.default_rng(123).permutation(names))


def test_heldout_count_rounds_and_always_leaves_training_images():
    assert [heldout_count(n, 0.1) for n in (1, 4, 5, 9, 20, 104)] == [0, 0, 1, 1, 2, 10]
    assert heldout_count(2, 0.9) == 1


def test_stratified_heldout_mask_counts_per_category():
    cats = categories_of({"a": 100, "b": 20, "c": 4, "d": 1})
    mask = stratified_heldout_mask(cats, 0.1, seed=0)
    held = Counter(c for c, h in zip(cats, mask, strict=True) if h)
    assert held == Counter({"a": 10, "b": 2})
    assert not stratified_heldout_mask(cats, 0.0, seed=0).any()


def test_stratified_heldout_mask_is_seeded():
    cats = categories_of({"a": 200, "b": 50})
    first = stratified_heldout_mask(cats, 0.2, seed=7)
    assert np.array_equal(first, stratified_heldout_mask(cats, 0.2, seed=7))
    assert not np.array_equal(first, stratified_heldout_mask(cats, 0.2, seed=8))


def test_stratified_heldout_mask_category_draw_ignores_other_categories():
    only_a = ["a"] * 50
    with_b = ["a"] * 50 + ["b"] * 30
    assert np.array_equal(
        stratified_heldout_mask(only_a, 0.2, 3), stratified_heldout_mask(with_b, 0.2, 3)[:50]
    )


def test_proportional_quotas_sum_to_total():
    quotas = proportional_quotas({"a": 60, "b": 30, "c": 9, "d": 1}, 10)
    assert quotas == {"a": 6, "b": 3, "c": 1, "d": 0}
    assert proportional_quotas({"a": 3, "b": 2}, 100) == {"a": 3, "b": 2}


def test_stratified_cap_is_proportional_and_seeded():
    cats = categories_of({"a": 600, "b": 300, "c": 100})
    keep = stratified_cap(cats, 100, seed=1)
    assert keep.sum() == 100
    assert Counter(c for c, k in zip(cats, keep, strict=True) if k) == {"a": 60, "b": 30, "c": 10}
    assert np.array_equal(keep, stratified_cap(cats, 100, seed=1))
    assert not np.array_equal(keep, stratified_cap(cats, 100, seed=2))
    assert stratified_cap(cats, None, seed=1).all()
    assert stratified_cap(cats, 5000, seed=1).all()


# --------------------------------------------------------------------------- images


def test_image_header_problem(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (20, 10), "red").save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    assert image_header_problem(good) is None
    assert image_header_problem(bad)[0] == "unreadable_image"
    reason, detail = image_header_problem(good, max_pixels=199)
    assert reason == "too_large" and "20x10" in detail


def test_deb_version():
    assert deb_version("openclipart-png_1%3a0.18+dfsg-19_all.deb") == (
        "openclipart-png",
        "1:0.18+dfsg-19",
    )
    assert deb_version("README.txt") is None


# --------------------------------------------------------------------------- pool end to end


def make_png(path: Path, color: str) -> None:
    """A small PNG of ``color``, with one pixel from the file name: no two files are equal."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (16, 12), color)
    digest = zlib.crc32(path.name.encode())
    image.putpixel((0, 0), (digest & 255, (digest >> 8) & 255, (digest >> 16) & 255))
    image.save(path)


def make_clipart_tree(base: Path) -> tuple[Path, Path]:
    """A small openclipart-like layout: png/ and svg/ with the same relative paths."""
    png, svg = base / "usr/share/openclipart/png", base / "usr/share/openclipart/svg"
    colors = ["red", "green", "blue", "yellow", "white", "black", "gray", "orange"]
    images = {f"animals/cat_{i:02d}": colors[i % 8] for i in range(12)}
    images |= {f"science/medicine/pill_{i:02d}": colors[i % 8] for i in range(6)}
    images |= {f"science/flask_{i:02d}": colors[i % 8] for i in range(4)}
    for rel, color in images.items():
        make_png(png / f"{rel}.png", color)
        svg_path = svg / f"{rel}.svg"
        svg_path.parent.mkdir(parents=True, exist_ok=True)
        name = rel.rsplit("/", 1)[1].split("_")[0]
        svg_path.write_text(svg_text(name.title(), [name, "", "animal", "Animal"]))
    # The same picture filed under a second category, as openclipart does with symlinks, and
    # once as a plain copy of the bytes.
    (png / "science/cat_link.png").symlink_to("../animals/cat_00.png")
    (svg / "science/cat_link.svg").symlink_to("../animals/cat_00.svg")
    (png / "science/cat_copy_05.png").write_bytes((png / "animals/cat_05.png").read_bytes())
    # A corrupt PNG, an image without SVG, a malformed SVG and an SVG with an empty title.
    (png / "animals/broken_99.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    (svg / "animals/broken_99.svg").write_text(svg_text("Broken", []))
    make_png(png / "animals/no_svg_dog_01.png", "red")
    make_png(png / "animals/bad_svg_owl_01.png", "red")
    (svg / "animals/bad_svg_owl_01.svg").write_text("<svg><metadata><dc:title>Owl")
    make_png(png / "animals/untitled_zebra_01.png", "red")
    (svg / "animals/untitled_zebra_01.svg").write_text(svg_text("", ["stripes"]))
    return png, svg


def run_pool(tmp_path: Path, source_args: list[str], *extra: str, tag: str = "run") -> dict:
    out = tmp_path / tag
    paths = {
        "urls": out / "urls.parquet",
        "heldout": out / "heldout.parquet",
        "dropped": out / "dropped.csv",
        "summary": out / "pool.json",
    }
    main(
        ["pool", *source_args]
        + ["--out-urls", str(paths["urls"]), "--out-heldout", str(paths["heldout"])]
        + ["--out-dropped", str(paths["dropped"]), "--out-summary", str(paths["summary"])]
        + list(extra)
    )
    with open(paths["dropped"]) as fh:
        dropped = list(csv.DictReader(fh))
    return {
        "train": pq.read_table(paths["urls"]),
        "heldout": pq.read_table(paths["heldout"]),
        "dropped": dropped,
        "summary": json.loads(paths["summary"].read_text()),
        "dir": out,
    }


@pytest.fixture
def clipart(tmp_path):
    png, svg = make_clipart_tree(tmp_path / "res")
    marker = tmp_path / "sources.json"
    marker.write_text(json.dumps({"png_root": str(png), "svg_root": str(svg)}))
    return png, svg, marker


def test_pool_end_to_end(tmp_path, clipart):
    png, _, marker = clipart
    result = run_pool(tmp_path, ["--source", str(marker)], "--heldout-fraction", "0.25")
    summary, train, heldout = result["summary"], result["train"], result["heldout"]

    dropped = {Path(row["path"]).name: row["reason"] for row in result["dropped"]}
    assert dropped == {
        "broken_99.png": "unreadable_image",
        "cat_link.png": "duplicate_link",
        "cat_copy_05.png": "duplicate_content",
    }
    assert summary["found"] == 28
    assert summary["dropped"] == {
        "duplicate_content": 1,
        "duplicate_link": 1,
        "unreadable_image": 1,
    }
    assert summary["train"] + summary["heldout"] + summary["capped_out"] + 3 == 28

    # No picture is in both splits: the kept files' bytes are all different.
    def digests(table):
        return {hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in table["path"].to_pylist()}

    assert not digests(train) & digests(heldout)
    assert len(digests(train) | digests(heldout)) == train.num_rows + heldout.num_rows
    assert (summary["train"], summary["heldout"]) == (train.num_rows, heldout.num_rows)
    # Usable: 15 animals -> 3.75 rounds to 4; 10 science -> 2.5 rounds up to 3.
    per_category = summary["per_category"]
    assert per_category["animals"]["heldout"] == 4
    assert per_category["science"]["heldout"] == 3

    assert train.column_names == [
        "url",
        "caption",
        "category",
        "subcategory",
        "title",
        "tags",
        "path",
    ]
    assert heldout.schema == train.schema
    rows = train.to_pylist() + heldout.to_pylist()
    assert len({r["path"] for r in rows}) == len(rows) == 25
    assert not {r["url"] for r in train.to_pylist()} & {r["url"] for r in heldout.to_pylist()}
    by_name = {Path(r["path"]).name: r for r in rows}

    pill = by_name["pill_03.png"]
    assert pill["category"] == "science" and pill["subcategory"] == "science/medicine"
    assert pill["caption"] == "Pill: animal" and pill["tags"] == ["animal"]
    assert pill["url"] == (png / "science/medicine/pill_03.png").resolve().as_uri()
    with urllib.request.urlopen(pill["url"]) as response:  # a URL img2dataset can fetch
        assert response.read() == Path(pill["path"]).read_bytes()

    assert by_name["no_svg_dog_01.png"]["caption"] == "no svg dog"
    assert by_name["bad_svg_owl_01.png"]["caption"] == "bad svg owl"
    assert by_name["untitled_zebra_01.png"]["caption"] == "untitled zebra: stripes"
    assert by_name["untitled_zebra_01.png"]["title"] == ""


def test_pool_is_deterministic_and_seeded(tmp_path, clipart):
    *_, marker = clipart
    args = ["--source", str(marker), "--heldout-fraction", "0.3"]
    first = run_pool(tmp_path, args, "--seed", "5", tag="a")
    again = run_pool(tmp_path, args, "--seed", "5", tag="b")
    other = run_pool(tmp_path, args, "--seed", "6", tag="c")
    assert first["train"].equals(again["train"]) and first["heldout"].equals(again["heldout"])
    assert not first["heldout"].equals(other["heldout"])


def test_pool_max_images_caps_by_category(tmp_path, clipart):
    *_, marker = clipart
    result = run_pool(tmp_path, ["--source", str(marker), "--max-images", "10"])
    summary = result["summary"]
    assert summary["train"] + summary["heldout"] == 10
    assert summary["capped_out"] == 25 - 10
    per_category = summary["per_category"]
    # 15 animals and 10 science images -> 6 and 4 of the 10.
    assert per_category["animals"]["train"] + per_category["animals"]["heldout"] == 6
    assert per_category["science"]["train"] + per_category["science"]["heldout"] == 4


def test_pool_from_image_dir_uses_file_names(tmp_path):
    root = tmp_path / "images"
    make_png(root / "birds/blue_jay_01.png", "blue")
    make_png(root / "birds/robin.jpg", "red")
    make_png(root / "cars/red_car_7.png", "red")
    make_png(root / "stray_image.png", "red")
    (root / "cars/notes.txt").write_text("not an image")
    result = run_pool(tmp_path, ["--image-dir", str(root)], "--heldout-fraction", "0")
    captions = sorted(result["train"]["caption"].to_pylist())
    assert captions == ["blue jay", "red car", "robin"]
    assert result["dropped"][0]["reason"] == "no_category"
    assert result["summary"]["found"] == 4 and result["summary"]["heldout"] == 0


def test_pool_bad_marker_names_the_key(tmp_path):
    marker = tmp_path / "sources.json"
    marker.write_text(json.dumps({"png_root": str(tmp_path), "svg_root": None}))
    with pytest.raises(UnicomError, match="svg_root"):
        run_pool(tmp_path, ["--source", str(marker)])


# --------------------------------------------------------------------------- fetch


@pytest.fixture
def no_apt(tmp_path, monkeypatch):
    """PATH without apt-get or dpkg: any attempt to download would fail loudly."""
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


def test_fetch_uses_existing_resources_dir(tmp_path, no_apt):
    res = tmp_path / "res"
    png, svg = make_clipart_tree(res)
    (res / "debs").mkdir()
    (res / "debs/openclipart-png_1%3a0.18+dfsg-19_all.deb").write_bytes(b"")
    marker = tmp_path / "out/sources.json"
    main(["fetch", "--resources-dir", str(res), "--out", str(marker)])
    content = json.loads(marker.read_text())
    assert content["source"] == "resources_dir"
    assert content["png_root"] == str(png.resolve()) and content["svg_root"] == str(svg.resolve())
    assert content["versions"] == {"openclipart-png": "1:0.18+dfsg-19"}
    assert content["num_png"] == 28  # 25 pictures + the corrupt one + the symlink + the copy


def test_fetch_fashion_mnist_uses_an_unpacked_copy(tmp_path, no_apt):
    res = tmp_path / "res"
    fashion = res / "usr/share/datasets/fashion-mnist"
    fashion.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        (fashion / name).write_bytes(b"")
    (res / "debs").mkdir()
    (res / "debs/dataset-fashion-mnist_0.0~git20200523.55506a9-2_all.deb").write_bytes(b"")
    marker = tmp_path / "out/fashion-mnist.json"
    main(["fetch-fashion-mnist", "--resources-dir", str(res), "--out", str(marker)])
    content = json.loads(marker.read_text())
    assert content["fashion_mnist_dir"] == str(fashion.resolve())
    assert content["versions"] == {"dataset-fashion-mnist": "0.0~git20200523.55506a9-2"}


def test_fetch_fashion_mnist_without_apt_says_what_to_set(tmp_path, no_apt):
    with pytest.raises(UnicomError) as error:
        main(
            ["fetch-fashion-mnist", "--resources-dir", str(tmp_path), "--out", str(tmp_path / "m")]
        )
    message = str(error.value)
    assert message.startswith("Fashion-MNIST could not be fetched (apt-get is not available)")
    assert "evaluate.datasets.fashion-mnist" in message and not (tmp_path / "m").exists()


def test_fetch_falls_back_to_system_packages(tmp_path, no_apt):
    system = tmp_path / "sys"
    png, _ = make_clipart_tree(system)
    marker = tmp_path / "sources.json"
    main(
        ["fetch", "--resources-dir", str(tmp_path / "res"), "--out", str(marker)]
        + ["--system-root", str(system), "--no-download"]
    )
    content = json.loads(marker.read_text())
    assert content["source"] == "system" and content["png_root"] == str(png.resolve())


def test_fetch_without_packages_fails_with_one_line_instructions(tmp_path):
    marker = tmp_path / "sources.json"
    result = subprocess.run(
        [sys.executable, "-m", "unicom.demo.build", "fetch"]
        + ["--resources-dir", str(tmp_path / "res"), "--out", str(marker)]
        + ["--system-root", str(tmp_path / "sys"), "--no-download"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1
    assert "apt-get install openclipart-png openclipart-svg" in errors[0]
    assert "demo.image_dir" in errors[0]
    assert not marker.exists()


# extract_debs in a process of its own under umask 002 (unicom.io reads the umask at import).
EXTRACT_UNDER_UMASK_002 = """
import sys
from pathlib import Path
from unicom.demo.debian import extract_debs
extract_debs([Path(sys.argv[1])], Path(sys.argv[2]), [Path("usr/share/games/openclipart")])
"""


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb (Debian)")
def test_unpacked_packages_are_group_writable_under_umask_002(tmp_path):
    """dpkg-deb -x keeps a package's modes (0644 / 0755); under umask 002 a group that shares
    the resources folder must be able to replace what was unpacked."""
    package = tmp_path / "pkg"
    (package / "DEBIAN").mkdir(parents=True)
    (package / "DEBIAN/control").write_text(
        "Package: openclipart-png\nVersion: 1.0\nArchitecture: all\n"
        "Maintainer: test <test@example.org>\nDescription: test\n"
    )
    folder = package / "usr/share/games/openclipart/png/animals"
    folder.mkdir(parents=True)
    (folder / "cat.png").write_bytes(b"png")
    for path in [package, *package.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    deb = tmp_path / "openclipart-png_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(package), str(deb)], check=True, capture_output=True)
    dest = tmp_path / "resources"
    subprocess.run(
        ["bash", "-c", 'umask 002 && exec "$@"', "-", sys.executable, "-c"]
        + [EXTRACT_UNDER_UMASK_002, str(deb), str(dest)],
        env={**os.environ, "PYTHONPATH": str(REPO / "workflow")},
        check=True,
    )
    unpacked = dest / "usr/share/games/openclipart"
    modes = {
        str(path.relative_to(unpacked)): stat.S_IMODE(path.stat().st_mode)
        for path in [unpacked, *unpacked.rglob("*")]
    }
    assert modes == {".": 0o775, "png": 0o775, "png/animals": 0o775, "png/animals/cat.png": 0o664}
    assert [p.name for p in dest.iterdir()] == ["usr"]  # the staging folder is gone


def test_fetch_reports_missing_apt_get(tmp_path, no_apt):
    with pytest.raises(UnicomError, match="apt-get is not available.*demo.image_dir"):
        fetch_sources(tmp_path / "res", tmp_path / "sys", allow_download=True)


def test_variants_of_one_picture_never_straddle_the_split():
    from unicom.demo.pool import variant_group

    cats = categories_of({"a": 60, "b": 40})
    # pairs (2i, 2i+1) of each category are one picture in colour and black-and-white, and
    # one picture has a variant in the other category
    names = [f"pic{i // 2}{'_bw' if i % 2 else ''}.png" for i in range(60)]
    names += [f"other{i // 2}{'_bw' if i % 2 else ''}.png" for i in range(38)]
    names += ["pic5_bw.png", "pic7_bw.png"]
    groups = [variant_group(Path(n)) for n in names]
    for seed in range(20):
        mask = stratified_heldout_mask(cats, 0.2, seed=seed, groups=groups)
        sides: dict[str, set] = {}
        for group, held in zip(groups, mask, strict=True):
            sides.setdefault(group, set()).add(bool(held))
        assert all(len(side) == 1 for side in sides.values()), seed
        assert 0 < mask.sum() <= 0.2 * len(cats) + 2


def test_singleton_groups_give_the_plain_per_item_split():
    cats = categories_of({"a": 100, "b": 20, "c": 4})
    plain = stratified_heldout_mask(cats, 0.1, seed=3)
    singletons = [f"x{i}" for i in range(len(cats))]
    assert np.array_equal(plain, stratified_heldout_mask(cats, 0.1, seed=3, groups=singletons))


@pytest.mark.slow
def test_the_real_openclipart_split_keeps_copies_and_variants_on_one_side():
    """Debian's openclipart pool (fetched like the rehearsal does): no picture's bytes and no
    drawing's black-and-white/colour variant on both sides of the held-out split."""
    from unicom.demo.debian import fetch_sources
    from unicom.demo.pool import build_pool, variant_group

    try:
        sources = fetch_sources(REPO / "resources", Path("/"), allow_download=True)
    except Exception:  # a fresh machine may need its package lists first
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        sources = fetch_sources(REPO / "resources", Path("/"), allow_download=True)
    result = build_pool(Path(sources["png_root"]), None, 0.1, None, seed=0)
    sides = [result.train["path"].to_pylist(), result.heldout["path"].to_pylist()]
    groups = [{variant_group(Path(p)) for p in paths} for paths in sides]
    assert not groups[0] & groups[1]
    bw = [p for p in sides[0] + sides[1] if "bw" in Path(p).stem.lower().split("_")]
    assert len(bw) > 40  # the variants are really there
    digests = [{hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths} for paths in sides]
    assert not digests[0] & digests[1]
    assert len(sides[1]) > 600
