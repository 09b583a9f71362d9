"""The rule files' layout: each reads rules/common.smk and itself, nothing else, and names the
functions it hands Snakemake instead of writing lambdas.

Snakemake's own parser turns each file into the Python it runs; :mod:`symtable` then says which
names each scope reads from the shared namespace. A rule file that reads a name another rule
file defines (or another file's ``rules.X`` / ``checkpoints.X``, or names another file's rule in
``localrules``, ``ruleorder`` or ``use rule``) works only because of the include order, and
fails here. ``python tests/test_rules.py`` prints the rules' sizes.
"""

from __future__ import annotations

import ast
import builtins
import io
import re
import symtable
import sys
import tempfile
import tokenize
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "rules"
COMMON = "common.smk"
# What a Snakefile gets from Snakemake itself (the documented Snakefile API).
SNAKEMAKE_NAMES = {
    "config", "workflow", "rules", "checkpoints", "shell", "expand", "multiext",
    "glob_wildcards", "temp", "protected", "directory", "touch", "ancient", "pipe", "service",
    "unpack", "report", "lookup", "evaluate", "branch", "collect", "exists", "flag", "update",
    "before_update", "ensure", "local", "from_queue", "storage", "scatter", "gather", "github",
    "gitlab", "gitfile", "access", "pep",
}  # fmt: skip
# The one name common.smk takes from a rule file: part_names() waits for the URL list's split
# (rules/download.smk) through the checkpoint object, Snakemake's only handle on it, and
# the linter keeps functions (common.smk) and rules (download.smk) in different files.
CHECKPOINT_EXCEPTION = ("common.smk", "checkpoints", "split_urls")
# The goal for a rule: from its `rule` line to the next top-level statement, on average.
MAX_LINES_PER_RULE = 25
RULE_LINE = re.compile(r"(\s*)(?:(?:rule|checkpoint) (\w+)|use rule \w+ as (\w+) with):\s*$")


def rule_files() -> list[Path]:
    return sorted(RULES.glob("*.smk"))


@cache
def translated(path: Path) -> str:
    """The Python Snakemake runs for ``path``."""
    import snakemake.api  # noqa: F401  (snakemake.parser needs the workflow module loaded)
    from snakemake import parser, sourcecache

    holder = SimpleNamespace(sourcecache=sourcecache.SourceCache(Path(tempfile.mkdtemp())))
    code, _ = parser.parse(sourcecache.LocalSourceFile(str(path)), holder, {})
    return code


def scopes(table: symtable.SymbolTable):
    yield table
    for child in table.get_children():
        yield from scopes(child)


def defined_names(code: str) -> set[str]:
    """Names the file binds in the shared namespace (not Snakemake's rule functions)."""
    module = symtable.symtable(code, "<rules>", "exec")
    return {
        symbol.get_name()
        for symbol in module.get_symbols()
        if (symbol.is_assigned() or symbol.is_imported() or symbol.is_namespace())
        and not symbol.get_name().startswith("__")
    }


def imported_names(code: str) -> set[str]:
    module = symtable.symtable(code, "<rules>", "exec")
    return {symbol.get_name() for symbol in module.get_symbols() if symbol.is_imported()}


def read_names(code: str) -> set[str]:
    """Names any scope of the file reads from the shared namespace."""
    module = symtable.symtable(code, "<rules>", "exec")
    names = set()
    for scope in scopes(module):
        for symbol in scope.get_symbols():
            if symbol.is_referenced() and (scope is module or symbol.is_global()):
                names.add(symbol.get_name())
    return names


def workflow_calls(code: str, method: str):
    """The calls of ``workflow.<method>(...)`` in the translated code."""
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == method
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "workflow"
        ):
            yield node


def keyword(call: ast.Call, name: str):
    return next(ast.literal_eval(k.value) for k in call.keywords if k.arg == name)


def rule_names(code: str) -> set[str]:
    """The rules (and checkpoints) the file defines, `use rule ... as` ones included."""
    names = {keyword(call, "name") for call in workflow_calls(code, "rule")}
    return names | {keyword(call, "name_modifier") for call in workflow_calls(code, "userule")}


def named_rules(code: str) -> list[tuple[str, str]]:
    """(how, rule) for every rule the file names: rules.X, checkpoints.X, localrules,
    ruleorder and the X of `use rule X as Y`."""
    named = []
    for node in ast.walk(ast.parse(code)):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("rules", "checkpoints")
        ):
            named.append((node.value.id, node.attr))
    for method in ("localrules", "ruleorder"):
        for call in workflow_calls(code, method):
            named += [(method, ast.literal_eval(arg)) for arg in call.args]
    for call in workflow_calls(code, "userule"):
        named += [("use rule", name) for name in keyword(call, "rules")]
    return named


def layout_problems(files: dict[str, str]) -> list[str]:
    """What breaks the rule: ``files`` maps a rule file's name to its translated code."""
    defined = {name: defined_names(code) for name, code in files.items()}
    rules_of = {name: rule_names(code) for name, code in files.items()}
    shared = defined.get(COMMON, set()) | SNAKEMAKE_NAMES | set(dir(builtins))
    problems = []
    for name, code in files.items():
        for read in sorted(read_names(code) - defined[name] - shared):
            owners = sorted(other for other, names in defined.items() if read in names)
            where = f"defined in {', '.join(owners)}" if owners else "defined in no rule file"
            problems.append(f"{name} reads {read}, {where}")
        for how, rule in named_rules(code):
            if rule not in rules_of[name] and (name, how, rule) != CHECKPOINT_EXCEPTION:
                problems.append(f"{name} names rule {rule} ({how}), not its own")
    # One owner per global: a name bound in two files has the value of the last included.
    for name, names in defined.items():
        for other, other_names in defined.items():
            twice = (names - imported_names(files[name])) & other_names
            for read in sorted(twice) if name < other else []:
                problems.append(f"{read} is defined in both {name} and {other}")
    return problems


def lambdas_without_reason(source: str) -> list[int]:
    """Lines of ``source`` with a lambda and no comment on that line or the one above."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    commented = {tok.start[0] for tok in tokens if tok.type == tokenize.COMMENT}
    lines = {tok.start[0] for tok in tokens if tok.type == tokenize.NAME and tok.string == "lambda"}
    return sorted(line for line in lines if not {line, line - 1} & commented)


def rule_spans(source: str) -> list[tuple[str, int]]:
    """(rule, lines) for every rule of a file: from its `rule`, `checkpoint` or `use rule`
    line to the next statement at its indentation or less (blank and comment lines do not
    start one)."""
    lines = source.splitlines()
    spans = []
    for i, line in enumerate(lines):
        found = RULE_LINE.match(line)
        if not found:
            continue
        indent, end = len(found.group(1)), len(lines)
        for j in range(i + 1, len(lines)):
            text = lines[j].strip()
            if (
                text
                and not text.startswith("#")
                and len(lines[j]) - len(lines[j].lstrip()) <= indent
            ):
                end = j
                break
        spans.append((found.group(2) or found.group(3), end - i))
    return spans


# --------------------------------------------------------------------------- the rule files


def test_each_rule_file_reads_only_common_smk_and_itself():
    files = {path.name: translated(path) for path in rule_files()}
    assert layout_problems(files) == []


def test_no_lambda_in_the_rules_without_a_comment_that_says_why():
    unexplained = {
        path.name: lines
        for path in [REPO / "Snakefile", *rule_files()]
        if (lines := lambdas_without_reason(path.read_text()))
    }
    assert unexplained == {}


def test_rules_stay_short():
    spans = [
        span
        for path in [REPO / "Snakefile", *rule_files()]
        for span in rule_spans(path.read_text())
    ]
    assert sum(lines for _, lines in spans) / len(spans) <= MAX_LINES_PER_RULE


# --------------------------------------------------------------------------- the checks


def translate_text(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return translated(path)


RULE = 'rule {name}:\n    output:\n        "{name}.txt",\n    shell:\n        "touch {{output}}"\n'


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        # a global of another rule file, read at parse time or in a function
        (
            {"a.smk": "A = 1\n", "b.smk": "B = A + 1\n"},
            "b.smk reads A, defined in a.smk",
        ),
        (
            {"common.smk": "def f():\n    return A\n", "a.smk": "A = 1\n"},
            "common.smk reads A, defined in a.smk",
        ),
        # a name nothing defines (the Snakefile's, or a missing import)
        ({"a.smk": "X = os.path.join('a', 'b')\n"}, "a.smk reads os, defined in no rule file"),
        # another file's rule, however named
        (
            {"a.smk": RULE.format(name="a"), "b.smk": "X = rules.a.output\n"},
            "b.smk names rule a (rules), not its own",
        ),
        (
            {"a.smk": RULE.format(name="a"), "b.smk": "localrules:\n    a,\n"},
            "b.smk names rule a (localrules), not its own",
        ),
        (
            {"a.smk": RULE.format(name="a"), "b.smk": RULE.format(name="b") + "ruleorder: b > a\n"},
            "b.smk names rule a (ruleorder), not its own",
        ),
        (
            {
                "a.smk": RULE.format(name="a"),
                "b.smk": "use rule a as b with:\n    output:\n        'b.txt',\n",
            },
            "b.smk names rule a (use rule), not its own",
        ),
        # two owners of one global
        ({"a.smk": "A = 1\n", "b.smk": "A = 2\n"}, "A is defined in both a.smk and b.smk"),
    ],
)
def test_the_layout_check_finds(tmp_path, files, problem):
    code = {name: translate_text(tmp_path, name, text) for name, text in files.items()}
    assert problem in layout_problems(code)


def test_the_layout_check_allows_common_smk_and_the_files_own_names(tmp_path):
    files = {
        "common.smk": "import os\nOUT = 'results'\n\ndef out(path):\n    return os.path.join(OUT, path)\n",
        "a.smk": "A = out('a')\n\n" + RULE.format(name="a") + "\n\nX = rules.a.output\n",
        # a function's own parameters and locals are not globals
        "b.smk": "B = [x for x in range(3)]\n",
    }
    code = {name: translate_text(tmp_path, name, text) for name, text in files.items()}
    assert layout_problems(code) == []


def test_lambdas_need_a_comment():
    source = "x = lambda a: a\n# the reason\ny = lambda a: a\nz = lambda a: a  # the reason\n"
    assert lambdas_without_reason(source) == [1]


def test_a_rule_ends_at_the_next_statement_at_its_level():
    source = (
        "rule a:\n    output:\n        'a',\n\n\n# a comment\nX = 1\n"
        "if X:\n\n    rule b:\n        output:\n            'b',\n\n    rule c:\n        output:\n"
        "            'c',\n\n\nuse rule c as d with:\n    output:\n        'd',\n"
        'X = """\nrule e: a string, not a rule\n"""\n'
    )
    assert rule_spans(source) == [("a", 6), ("b", 4), ("c", 5), ("d", 3)]


if __name__ == "__main__":
    spans = [
        (path.name, rule, lines)
        for path in [REPO / "Snakefile", *rule_files()]
        for rule, lines in rule_spans(path.read_text())
    ]
    if "-v" in sys.argv:
        for name, rule, lines in spans:
            print(f"{name:16} {lines:4}  {rule}")
    smk = sum(len(p.read_text().splitlines()) for p in [REPO / "Snakefile", *rule_files()])
    print(f"{len(spans)} rules, {sum(n for *_, n in spans) / len(spans):.1f} lines per rule")
    print(f"Snakefile + rules/*.smk: {smk} lines")
