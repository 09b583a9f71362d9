"""The docs site (mkdocs.yml, docs/): the configuration reference is the schema's, every page is
in the nav, the command blocks of all pages are marked and their ids unique, copies and shown
files are what they copy. (tests/test_readme.py runs the blocks; `make lint` builds the site.)"""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from unicom.config import load_schema
from unicom.errors import UnicomError
from unicom.schema_reference import COMMAND, plain, reference, type_text

from helpers import REPO
from readme import DOCS, all_blocks, check_copy, readme_block

REFERENCE = DOCS / "configuration-reference.md"
# A yaml block that shows a committed file as it is.
SHOWN_FILE = re.compile(r"^<!--\s*file:\s*(\S+)\s*-->\n```yaml\n(.*?)^```$", re.M | re.S)


def schema_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for name, spec in node.get("properties", {}).items():
        keys.append(prefix + name)
        keys += schema_keys(spec, f"{prefix}{name}.")
    return keys


def test_the_configuration_reference_is_the_schemas():
    assert REFERENCE.read_text() == reference(load_schema()), (
        f"docs/configuration-reference.md differs from config/schema.yaml: run `{COMMAND}`"
    )


def test_the_reference_gives_every_key_its_type_default_and_description():
    schema = load_schema()
    page = reference(schema)
    keys = schema_keys(schema)
    assert len(keys) > 250
    for key in keys:
        assert f"`{key}`" in page, key
    lines = page.splitlines()
    k = schema["properties"]["kmeans"]["properties"]["k"]
    assert (
        f"| `kmeans.k` | integer (≥ {k['minimum']}) | `{k['default']}` | {k['description']} |"
        in lines
    )
    planning = next(line for line in lines if line.startswith("| `evaluate.datasets.sop` |"))
    assert "**Planning.**" not in planning  # the section is x-planning, its keys are not marked
    assert "**Planning.**" in page.split("### `evaluate.datasets`")[1].split("|")[0]
    gpus = next(line for line in lines if line.startswith("| `train.gpus` |"))
    assert "| **Job resource.** " in gpus


@pytest.mark.parametrize("field", ["description", "default"])
def test_a_key_the_schema_leaves_undescribed_stops_the_reference(field):
    schema = copy.deepcopy(load_schema())
    del schema["properties"]["kmeans"]["properties"]["niter"][field]
    with pytest.raises(UnicomError, match=f"config key kmeans.niter: the schema gives no {field}"):
        reference(schema)


def test_reference_text_keeps_tables_and_code_intact():
    assert plain("a <root>/x | b *c*\n  d `e|f`") == r"a &lt;root&gt;/x \| b \*c\* d `e|f`"
    assert type_text({"type": ["integer", "null"], "minimum": 1}) == "integer or null (≥ 1)"
    assert type_text({"enum": ["auto", True, False]}) == "one of `auto`, `true`, `false`"
    assert type_text({"anyOf": [{"const": "full"}, {"type": "integer", "minimum": 1}]}) == (
        "`full` or integer (≥ 1)"
    )


def nav_pages(nav: list) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_once():
    nav = nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(p.name for p in DOCS.glob("*.md"))
    assert len(nav) == len(set(nav))


def test_every_command_block_is_marked_with_a_unique_id_and_copies_match():
    blocks = all_blocks()  # raises on a block without a marker, or an id given twice
    assert {b.path.name for b in blocks} > {"README.md", "real-run.md", "rerunning.md"}
    problems = [p for b in blocks if b.mode == "copy" for p in check_copy(b, blocks)]
    assert not problems, "\n".join(problems)
    # the blocks other tests run (test_rehearsal.py, test_slurm.py), wherever they live now
    assert readme_block("site").mode == "run"
    assert readme_block("rehearsal").options["by"] == "tests/test_rehearsal.py"
    assert readme_block("slurm-cancel").options["by"] == "tests/test_slurm.py"


def test_an_id_given_twice_or_a_copy_that_drifted_fails(tmp_path):
    one, two = tmp_path / "one.md", tmp_path / "two.md"
    one.write_text("<!-- test: run id=a -->\n```bash\ntrue\n```\n")
    two.write_text("<!-- test: run id=a -->\n```bash\nfalse\n```\n")
    with pytest.raises(ValueError, match="two.md:2: id=a again"):
        all_blocks([one, two])
    two.write_text("<!-- test: copy of=a -->\n```bash\nfalse\n```\n")
    blocks = all_blocks([one, two])
    assert check_copy(blocks[1], blocks) == ["two.md:2: differs from id=a (one.md:2)"]
    two.write_text("<!-- test: copy of=b -->\n```bash\ntrue\n```\n")
    blocks = all_blocks([one, two])
    assert check_copy(blocks[1], blocks) == ["two.md:2: a copy of id='b', which no block has"]


def test_a_shown_config_file_is_the_committed_one():
    shown = [m for page in DOCS.glob("*.md") for m in SHOWN_FILE.finditer(page.read_text())]
    assert shown, "no <!-- file: ... --> block"
    for match in shown:
        assert (REPO / match.group(1)).read_text() == match.group(2), match.group(1)
