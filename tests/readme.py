"""The command blocks of README.md and of the docs site's pages (docs/*.md), as tests run them.

Every fenced ``bash`` or ``python`` block says how it is checked, in an HTML comment on the line
before it (invisible on GitHub and on the site):

    <!-- test: run [id=NAME] -->                 run as written
    <!-- test: dry-run [id=NAME] [jobs=rule:N,...] [expect="text"] -->
                                                 every snakemake command with --dry-run added
                                                 (a --report command is skipped); jobs: the
                                                 planned jobs of those rules; expect: printed
    <!-- test: elsewhere id=NAME by=tests/x.py -->  run for real by that test (not twice)
    <!-- test: copy of=NAME -->                  the same text as block NAME (shown on two
                                                 pages, checked once)

Ids are unique across all the documents. Commands run in a copy of the repository (what a fresh
clone holds), in document order: README.md first, then the docs pages by name, so a block sees
what the blocks before it made (the README's config/site.yaml). Paths under /data and /models
are the user's: a test maps each to a fixture; any other path stays as written.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
LANGUAGES = ("bash", "python")
MODES = ("run", "dry-run", "elsewhere", "copy")
# A path the README marks as the user's: anything under /data or /models.
USER_PATH = re.compile(r"(?<![\w./-])/(?:data|models)/[^\s\"'\]},)]+")
MARKER = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->$")
FENCE = re.compile(r"^```(\w*)\s*$")

# Inside a dry-run block: snakemake plans only (a --report needs results: skipped), and `make`
# targets run their recipe's snakemake lines the same way; `make test` is this suite itself.
DRY_RUN_PRELUDE = r"""
snakemake() {
    for arg in "$@"; do [ "$arg" = --report ] && { echo "skipped in a dry run: snakemake $*"; return 0; }; done
    command snakemake "$@" --dry-run
}
make() {
    if [ "$1" = test ]; then echo "not runnable here: make test runs this suite"; return 0; fi
    command make --no-print-directory -n "$@" | grep -E '(^|/)snakemake ' | while read -r line; do
        eval "snakemake ${line#*snakemake }"
    done
}
"""


@dataclass
class Block:
    """One command block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    mode: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        name = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path.name
        return f"{name}:{self.line}"

    @property
    def id(self) -> str:
        return self.options.get("id", self.where)

    def expected_jobs(self) -> dict[str, int]:
        pairs = [item.split(":") for item in self.options.get("jobs", "").split(",") if item]
        return {rule: int(count) for rule, count in pairs}


def parse_marker(text: str, where: str) -> tuple[str, dict[str, str]]:
    words = shlex.split(text)
    if not words or words[0] not in MODES:
        raise ValueError(f"{where}: test marker {text!r} starts with none of {MODES}")
    options = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep:
            raise ValueError(f"{where}: test marker option {word!r} is not key=value")
        options[key] = value
    return words[0], options


def command_blocks(text: str, path: Path = README) -> list[Block]:
    """Every bash/python block of ``text`` with its marker; a block without one is an error
    (a command nobody checks is how the README broke)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        language = fence.group(1)
        if language in LANGUAGES:
            where = f"{path.name}:{i + 1}"
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            if marker is None:
                raise ValueError(f"{where}: a {language} block without a <!-- test: ... --> line")
            mode, options = parse_marker(marker.group(1), where)
            body = "\n".join(lines[i + 1 : end]) + "\n"
            blocks.append(Block(path, i + 1, language, body, mode, options))
        i = end + 1
    return blocks


def documents() -> list[Path]:
    """The files whose command blocks are checked, in the order they run."""
    return [README, *sorted(DOCS.glob("*.md"))]


def all_blocks(paths: list[Path] | None = None) -> list[Block]:
    """Every command block of ``paths`` (default: the README and the docs pages), in order; an
    id given twice is an error (``readme_block`` and the tests that run a block name it)."""
    blocks = [b for path in paths or documents() for b in command_blocks(path.read_text(), path)]
    seen: dict[str, Block] = {}
    for block in blocks:
        if "id" in block.options:
            if block.id in seen:
                raise ValueError(
                    f"{block.where}: id={block.id} again (first at {seen[block.id].where})"
                )
            seen[block.id] = block
    return blocks


def readme_block(block_id: str, path: Path | None = None) -> Block:
    """The block whose marker says ``id=block_id``, wherever it lives (README.md or a docs page;
    only ``path`` when given)."""
    blocks = command_blocks(path.read_text(), path) if path else all_blocks()
    matches = [b for b in blocks if b.id == block_id]
    if len(matches) != 1:
        where = path.name if path else "README.md and docs/"
        raise LookupError(f"{where}: {len(matches)} blocks with id={block_id}")
    return matches[0]


def check_copy(block: Block, blocks: list[Block]) -> list[str]:
    """A ``copy`` block must show exactly the text of the block it names."""
    name = block.options.get("of", "")
    originals = [b for b in blocks if b.id == name and b.mode != "copy"]
    if not originals:
        return [f"{block.where}: a copy of id={name!r}, which no block has"]
    if block.text != originals[0].text:
        return [f"{block.where}: differs from id={name} ({originals[0].where})"]
    return []


def user_paths(text: str) -> list[str]:
    return sorted(set(USER_PATH.findall(text)))


def with_fixtures(text: str, fixtures: dict[str, str]) -> str:
    """``text`` with every user path replaced by its fixture; an unknown one is an error."""
    unknown = [p for p in user_paths(text) if p not in fixtures]
    if unknown:
        raise KeyError(f"user paths without a fixture: {unknown}")
    for path in sorted(fixtures, key=len, reverse=True):
        text = text.replace(path, fixtures[path])
    return text


def repository_copy(dest: Path) -> Path:
    """What a fresh clone holds (tracked files and new ones not ignored), with the
    environment's .venv linked in (the README's commands assume `make` set it up)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source, target = REPO / name, dest / name
        if not os.path.lexists(source):  # deleted in the work tree, not yet in git
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    venv = Path(sys.executable).resolve().parents[1]
    if not (dest / ".venv").exists():
        (dest / ".venv").symlink_to(venv if (venv / "bin").is_dir() else REPO / ".venv")
    return dest


def environment() -> dict[str, str]:
    """A user's shell after `make setup`: the venv first on PATH, no model hub."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
    }


def run_block(
    block: Block, cwd: Path, fixtures: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """Run ``block`` in ``cwd`` as its marker says (run or dry-run), user paths replaced."""
    text = with_fixtures(block.text, fixtures)
    if block.language == "python":
        command = [sys.executable, "-c", text]
    else:
        prelude = DRY_RUN_PRELUDE if block.mode == "dry-run" else ""
        command = ["bash", "-euo", "pipefail", "-c", prelude + text]
    return subprocess.run(
        command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def job_counts(output: str) -> dict[str, int]:
    """Rule -> planned jobs in the "Job stats" tables of a (dry) run's output (Snakemake prints
    the same table more than once; a block's several commands: the most of any)."""
    counts: dict[str, int] = {}
    for table in output.split("Job stats:")[1:]:
        rows = re.findall(r"^(\w+)\s+(\d+)$", table.split("\n\n", 1)[0], re.M)
        for rule, count in rows:
            if rule != "total":
                counts[rule] = max(counts.get(rule, 0), int(count))
    return counts


def check_result(block: Block, result: subprocess.CompletedProcess) -> list[str]:
    """What is wrong with a block's run: its exit status, its planned jobs, expected text."""
    output = result.stdout + result.stderr
    if result.returncode != 0:
        return [f"{block.where} exited {result.returncode}:\n{output[-3000:]}"]
    problems = []
    counts = job_counts(output)
    for rule, count in block.expected_jobs().items():
        if counts.get(rule, 0) != count:  # rule:0 says the rule plans no job
            problems.append(
                f"{block.where}: planned {counts.get(rule, 0)} {rule} jobs, not {count}"
            )
    expected = block.options.get("expect")
    if expected and expected not in output:
        problems.append(f"{block.where}: printed no {expected!r}")
    return problems
