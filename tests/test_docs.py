"""The docs the code cites: every "eq. N" under src/ has an entry in docs/equations.md, every function that
index names exists, and every docs/<page>.md#<anchor> cited in the code or the docs resolves to a heading."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC, DOCS = ROOT / "src", ROOT / "docs"
EQUATION_CITATION = re.compile(r"\b(?:eqs?\.|equations?)\s*(\d+)(?:\s*(?:to|-|and|,)\s*(\d+))?", re.IGNORECASE)
DOTTED_NAME = re.compile(r"`(gaincell(?:\.\w+)+)`")
LINK = re.compile(r"\(([\w-]+\.md)(?:#([\w-]+))?\)")


def _cited_equations():
    cited = {}
    for path in SRC.rglob("*.py"):
        for match in EQUATION_CITATION.finditer(path.read_text()):
            first, last = int(match.group(1)), int(match.group(2) or match.group(1))
            for n in range(first, last + 1):
                cited.setdefault(n, str(path.relative_to(ROOT)))
    return cited


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path):
    return {_slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


def _defines(module_file: Path, names):
    """Whether ``module_file`` defines the attribute chain ``names`` (functions, classes, methods, assignments)."""
    body = ast.parse(module_file.read_text()).body
    for name in names:
        found = None
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                found = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                    found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


def _resolve(dotted: str):
    """The file and attribute chain of ``gaincell.a.b.func`` (the longest prefix that is a module)."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = SRC.joinpath(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[cut:]
    return None, parts


def test_every_cited_equation_is_in_the_index():
    index = DOCS / "equations.md"
    entries = {int(n) for n in re.findall(r"^## eq\. (\d+)$", index.read_text(), flags=re.MULTILINE)}
    cited = _cited_equations()
    assert {9, 3, 4} <= set(cited), "the attention and adaptation code should cite its equations"
    missing = {n: where for n, where in cited.items() if n not in entries}
    assert not missing, f"cited in the code but absent from docs/equations.md: {missing}"


def test_every_function_in_the_index_exists():
    names = DOTTED_NAME.findall((DOCS / "equations.md").read_text())
    assert len(names) > 30
    unresolved = []
    for dotted in names:
        module_file, chain = _resolve(dotted)
        if module_file is None or not _defines(module_file, chain):
            unresolved.append(dotted)
    assert not unresolved, f"docs/equations.md names what the code does not define: {unresolved}"


def test_links_between_docs_and_from_the_code_resolve():
    broken = []
    sources = list(DOCS.glob("*.md")) + list(SRC.rglob("*.py"))
    for path in sources:
        text = path.read_text()
        links = LINK.findall(text) if path.suffix == ".md" else re.findall(r"docs/([\w-]+\.md)(?:#([\w-]+))?", text)
        for page, anchor in links:
            target = DOCS / page
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path.relative_to(ROOT)}: {page}#{anchor}")
    assert not broken, broken


def test_the_code_cites_the_docs_not_the_old_spec_sections():
    old = [f"{p.relative_to(ROOT)}" for p in SRC.rglob("*.py") if re.search(r"spec\s*§|spec [\w-]+\.md", p.read_text())]
    assert not old, f"cite 'eq. N' or docs/<page>.md#<section> instead of the spec: {old}"


def test_the_checks_above_can_fail(tmp_path):
    """The resolvers reject what does not exist (so the tests above are not vacuous)."""
    module_file, chain = _resolve("gaincell.attention.reference.no_such_function")
    assert module_file is not None and not _defines(module_file, chain)
    assert not _defines(*_resolve("gaincell.no_such_module.f"))
    assert "charge-to-pulse" in _anchors(DOCS / "attention.md") and "nowhere" not in _anchors(DOCS / "attention.md")
    assert list(EQUATION_CITATION.finditer("eq. 3 to 5"))[0].groups() == ("3", "5")
