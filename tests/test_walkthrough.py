"""docs/walkthrough.md runs as written: every ```python block, in order, in one namespace, and
each prints what the page says it prints (shapes and integers exactly, decimals within 0.05)."""
import contextlib
import io
import re

import torch

from conftest import ROOT

NUMBER = re.compile(r"-?\d+\.\d+|-?\d+")


def blocks(text):
    """[(code, expected output)]: each python block and the indented block that follows it."""
    out = []
    for m in re.finditer(r"```python\n(.*?)```\n(\n(?:    [^\n]*\n|\n)*)?", text, re.S):
        expected = "\n".join(line[4:] for line in (m.group(2) or "").splitlines() if line.startswith("    "))
        out.append((m.group(1), expected))
    return out


def same_output(got, want):
    """The same text once numbers are masked, and each number equal (decimals within 0.05)."""
    if NUMBER.sub("#", got.strip()) != NUMBER.sub("#", want.strip()):
        return False
    return all(a == b if "." not in a + b else abs(float(a) - float(b)) <= 0.05
               for a, b in zip(NUMBER.findall(got), NUMBER.findall(want)))


def test_every_block_of_the_walkthrough_runs_in_order_and_prints_what_the_page_shows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the figures land here
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only wait for each other on a busy CPU
    namespace = {}
    try:
        for i, (code, expected) in enumerate(blocks((ROOT / "docs" / "walkthrough.md").read_text()), start=1):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"walkthrough block {i}", "exec"), namespace)
            assert same_output(printed.getvalue(), expected), f"block {i} printed:\n{printed.getvalue()}"
    finally:
        torch.set_num_threads(threads)
    assert i == 7 and all((tmp_path / f"walkthrough_{name}.png").exists() for name in ("masked", "reconstructions", "cka"))
