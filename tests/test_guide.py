"""The README's reading guide cannot drift: every link `[text](file.py#La-Lb)` must start where
the first definition its text names starts (its def / class line, a decorator, or the comment
block above it) and end where the last one ends; `docstring` is the module docstring,
`docstring: X` its paragraph that begins with X."""
import ast
import re

from conftest import ROOT

LINK = re.compile(r"\[([^\]]+)\]\((\w+\.py)#L(\d+)-L(\d+)\)")


def definitions(path):
    """name -> (first line with the comments above, def line, last line) for every function,
    class, method (Class.name) and module-level assignment of one name; '' -> the docstring."""
    text = (ROOT / path).read_text()
    lines, tree, out = text.splitlines(), ast.parse(text), {}
    if ast.get_docstring(tree) is not None:
        out[""] = (1, 1, tree.body[0].end_lineno)

    def visit(body, prefix):
        for node in body:
            names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                [t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else []
            for name in names:
                start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
                lead = above = start  # the comment block above it, across blank lines
                while above > 1 and (not lines[above - 2].strip() or lines[above - 2].lstrip().startswith("#")):
                    above -= 1
                    lead = above if lines[above - 1].strip() else lead
                out[prefix + name] = (lead, start, node.end_lineno)
            if isinstance(node, ast.ClassDef):
                visit(node.body, node.name + ".")
    visit(tree.body, "")
    return out, lines


def check(text, path, a, b):
    """None if the link holds, else why not."""
    defs, lines = definitions(path)
    if text.startswith("docstring"):
        first, _, last = defs[""]
        label = text.partition(":")[2].strip()
        if not label:
            return None if (a, b) == (first, last) else f"the docstring is lines {first}-{last}"
        if not (first <= a <= b < last and lines[a - 1].strip().startswith(label)):
            return f"line {a} does not begin the docstring's paragraph {label!r}"
        return None if not lines[b].startswith(" ") else f"line {b + 1} continues the paragraph"
    names = re.findall(r"`([^`]+)`", text)
    missing = [n for n in names if n not in defs]
    if not names or missing:
        return f"no definition named {missing or text!r} in {path}"
    lead, start, _ = defs[names[0]]
    end = defs[names[-1]][2]
    if a not in (lead, start) or b != end:
        return f"{names[0]} starts at line {start} (comments from {lead}), {names[-1]} ends at line {end}"
    return None


def test_every_range_of_the_reading_guide_starts_and_ends_at_the_definitions_it_names():
    readme = (ROOT / "README.md").read_text()
    links = LINK.findall(readme[readme.index("## Reading the code"):])
    assert len(links) > 30
    wrong = [f"[{t}]({p}#L{a}-L{b}): {why}" for t, p, a, b in links if (why := check(t, p, int(a), int(b)))]
    assert not wrong, "\n".join(wrong)


def test_the_check_fails_on_a_range_moved_by_one_line():
    """A line added above a cited definition moves it: the old range is then reported."""
    defs, _ = definitions("mae_pretrain.py")
    _, start, end = defs["random_masking"]
    assert check("`random_masking`", "mae_pretrain.py", start, end) is None
    assert check("`random_masking`", "mae_pretrain.py", start + 1, end + 1) is not None
    assert check("`no_such_function`", "mae_pretrain.py", start, end) is not None
