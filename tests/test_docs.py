"""The user docs (README.md, docs/*.md) against the code and against themselves: the recipe
reference (docs/recipe.md) lists exactly the recipe keys of fatscale.config.Recipe with their
types, defaults and checks; every relative link points at a file that exists (and a #anchor at a
heading of it); README.md stays a map (at most 300 lines); no doc names the test setup's
../shared tree, which a user does not have.

`python tests/test_docs.py` prints the key | type | default columns of the recipe reference as
the code has them, to paste into docs/recipe.md (the meaning column is written by hand)."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import types
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
RECIPE_DOC = DOCS / "recipe.md"
README_MAX_LINES = 300


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def shown(path: Path) -> str:
    """A path as a message names it: relative to the repository where it is inside it."""
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


# --- the recipe schema, as the code has it -------------------------------------------------------
#
# The rule for the docs table, one row per key:
#   key      the dotted path from the recipe's top (`train.batch_per_device`, `data.resolution.start`);
#            a section every recipe has (model, data, aug, ...) has no row of its own, a section that
#            may be null (`data.resolution`) has one (type `section or null`), then rows for its keys.
#   type     int, float, str, bool, any; `X or null` where null is allowed; `X or Y` for a union;
#            `one of A, B, C` for a fixed set (JSON values); `list of X` for a list of any length;
#            `[X, Y]` for a list of exactly those; `mapping of str to X`; `section` for a nested
#            section.
#   default  `required` where the key has none, else the default as JSON (null, true, 0.0005,
#            "auto", [0.08, 1.0]): json.dumps with tuples as lists.
# Cells may be wrapped in backticks.


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp) and isinstance(tp, type)


def _non_null(tp) -> list:
    return [a for a in typing.get_args(tp) if a is not type(None)]


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def render_type(tp) -> str:
    if _is_union(tp):
        options = " or ".join(render_type(a) for a in _non_null(tp))
        return f"{options} or null" if type(None) in typing.get_args(tp) else options
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(json.dumps(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {render_type(args[0])}"
        return "[" + ", ".join(render_type(a) for a in args) + "]"
    if typing.get_origin(tp) is list:
        return f"list of {render_type(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        key, value = typing.get_args(tp)
        return f"mapping of {render_type(key)} to {render_type(value)}"
    if _is_section(tp):
        return "section"
    if tp is typing.Any:
        return "any"
    return tp.__name__


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def render_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return json.dumps(_plain(field.default))
    if field.default_factory is not dataclasses.MISSING:
        return json.dumps(_plain(field.default_factory()))
    return "required"


def check_words(field: dataclasses.Field) -> str | None:
    """What config.py says a value "must be" for this key (the ``what`` of its ``must`` check), or
    None where the check is a function of its own (model.name, aug.rand_augment, data.eval_sizes)."""
    check = field.metadata.get("check")
    if check is None:
        return None
    try:
        what = inspect.getclosurevars(check).nonlocals.get("what")
    except TypeError:
        return None
    return what if isinstance(what, str) else None


@dataclasses.dataclass(frozen=True)
class Key:
    type: str
    default: str
    must_be: str | None


def recipe_keys() -> dict[str, Key]:
    """Every dotted recipe key of fatscale.config.Recipe, walked through its dataclass tree."""
    from fatscale.config import Recipe  # the section classes may live anywhere: reach them from here

    keys: dict[str, Key] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            tp, key = hints[field.name], f"{prefix}{field.name}"
            if _is_section(tp):  # a section every recipe has: its keys only
                walk(tp, f"{key}.")
                continue
            keys[key] = Key(render_type(tp), render_default(field), check_words(field))
            sections = [a for a in _non_null(tp) if _is_section(a)] if _is_union(tp) else []
            for section in sections:  # a section that may be null: its row, then its keys
                walk(section, f"{key}.")

    walk(Recipe, "")
    return keys


# --- the recipe reference, as docs/recipe.md has it ----------------------------------------------

ROW = re.compile(r"^\|(.*)\|\s*$")


def _cell(text: str) -> str:
    text = text.strip()
    return text[1:-1].strip() if len(text) >= 2 and text[0] == text[-1] == "`" else text


def documented_keys() -> dict[str, tuple[str, str, str]]:
    """{key: (type, default, meaning)} from every table of docs/recipe.md whose header starts with
    key | type | default | meaning; a key listed twice is an error."""
    rows: dict[str, tuple[str, str, str]] = {}
    in_table = False
    for number, line in enumerate(RECIPE_DOC.read_text().splitlines(), 1):
        match = ROW.match(line.strip())
        if not match:
            in_table = False
            continue
        cells = [c.strip() for c in match[1].split("|")]
        if [c.lower() for c in cells[:4]] == ["key", "type", "default", "meaning"]:
            in_table = True
            continue
        if not in_table or set("".join(cells)) <= set("-: "):
            continue
        assert len(cells) == 4, f"docs/recipe.md:{number}: a row needs 4 cells (no | inside a cell): {line}"
        key = _cell(cells[0])
        assert key not in rows, f"docs/recipe.md:{number}: {key} is listed twice"
        rows[key] = (_cell(cells[1]), _cell(cells[2]), cells[3])
    return rows


def expected_row(key: str, spec: Key) -> str:
    return f"| `{key}` | {spec.type} | `{spec.default}` | ... |"


def test_the_recipe_reference_lists_every_key_of_the_code_with_its_type_and_default():
    code, docs = recipe_keys(), documented_keys()
    assert len(code) > 50  # the walk found the schema
    missing = [expected_row(k, code[k]) for k in code if k not in docs]
    extra = [k for k in docs if k not in code]
    wrong = []
    for key in code.keys() & docs.keys():
        doc_type, doc_default, _ = docs[key]
        if (doc_type, doc_default) != (code[key].type, code[key].default):
            wrong.append(f"{key}: docs say type {doc_type!r}, default {doc_default!r}; the code: "
                         f"{expected_row(key, code[key])}")
    problems = []
    if missing:
        problems.append("keys missing from docs/recipe.md (add these rows, with their meaning):\n  " + "\n  ".join(missing))
    if extra:
        problems.append("keys in docs/recipe.md that fatscale.config.Recipe does not have (remove them):\n  "
                        + "\n  ".join(extra))
    if wrong:
        problems.append("rows whose type or default differs from fatscale.config:\n  " + "\n  ".join(sorted(wrong)))
    assert not problems, "\n".join(problems)


def test_the_recipe_reference_states_each_check_as_the_code_words_it():
    code, docs = recipe_keys(), documented_keys()
    unstated = [f"{key}: the meaning should say it must be {spec.must_be!r} (config.py's words); it says: "
                f"{docs[key][2]!r}"
                for key, spec in code.items() if key in docs and spec.must_be and spec.must_be not in docs[key][2]]
    assert not unstated, "\n".join(unstated)


# --- links, length, the test setup -------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _prose(path: Path) -> list[tuple[int, str]]:
    """The lines of a Markdown file outside fenced code blocks, numbered."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            anchor = github_anchor(match[1])
            count = seen.get(anchor, 0)
            seen[anchor] = count + 1
            result.add(anchor if count == 0 else f"{anchor}-{count}")
    return result


def test_every_relative_link_points_at_a_file_that_exists():
    broken = []
    for path in doc_files():
        for number, line in _prose(path):
            for match in LINK.finditer(line):
                target = match[1] or match[2]
                if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                    continue
                file_part, _, anchor = target.partition("#")
                where = (path.parent / file_part).resolve() if file_part else path
                name = f"{shown(path)}:{number}: {target}"
                if not where.exists():
                    broken.append(f"{name} (no such file)")
                elif anchor and where.suffix == ".md" and anchor not in anchors(where):
                    broken.append(f"{name} (no heading with anchor #{anchor} in {shown(where)})")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


REPO_PATH = re.compile(r"`((?:fatscale|launch|data_prep|recipes|benchmarks|install|tests|\.ci)/[\w./-]*)`")


def test_every_file_of_this_repository_the_docs_name_exists():
    """`fatscale/checkpoint/layout.py`, `benchmarks/startup.py`, ...: code moves; the docs follow."""
    gone = [f"{shown(path)}:{number}: {match[1]}"
            for path in doc_files() for number, line in _prose(path) for match in REPO_PATH.finditer(line)
            if not (REPO / match[1]).exists()]
    assert not gone, "the docs name files that do not exist (moved? say where they are now):\n  " + "\n  ".join(gone)


def test_the_readme_is_a_map_of_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): move the detail "
                                       "into docs/*.md and link to it")


def test_no_doc_names_the_test_setups_shared_tree():
    found = [f"{shown(path)}:{number}: {line.strip()}"
             for path in doc_files()
             for number, line in enumerate(path.read_text().splitlines(), 1) if "../shared" in line]
    assert not found, ("../shared exists only in this repository's test setup; describe what a user has "
                       "instead (e.g. a 1000-image ImageNet sample):\n  " + "\n  ".join(found))


def test_the_docs_exist_and_the_readme_links_each_of_them():
    docs = sorted(p.name for p in DOCS.glob("*.md"))
    assert "recipe.md" in docs
    readme = README.read_text()
    unlinked = [name for name in docs if f"(docs/{name}" not in readme]
    assert not unlinked, f"README.md does not link to: {', '.join(unlinked)}"


if __name__ == "__main__":
    print("| key | type | default | meaning |\n|---|---|---|---|")
    for key, spec in recipe_keys().items():
        meaning = f"Must be {spec.must_be}." if spec.must_be else ""
        print(f"| `{key}` | {spec.type} | `{spec.default}` | {meaning} |")
