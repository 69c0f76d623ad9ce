"""Every command in README.md and docs/*.md names flags its stage has: each `python X.py ...` or
`torchrun ... X.py ...` line, with the shell variables of its block filled in, parses with the
stage's own argument parser (a renamed or removed flag fails here). The commands that run on a
CPU in seconds to minutes are run by the other tests and the walk-through."""
import re
import shlex

import pytest

import analyze
import checkpoints
import distill_pretrain
import finetune
import mae_pretrain
from conftest import ROOT

STAGES = {"mae_pretrain.py": mae_pretrain, "distill_pretrain.py": distill_pretrain, "finetune.py": finetune,
          "analyze.py": analyze, "checkpoints.py": checkpoints}


def commands(text):
    """(command, its arguments) for every stage command of the indented blocks of a page, with
    VAR="..." assignments and the first value of `for VAR in ...` substituted."""
    found, env = [], {}
    lines = [line[4:] for line in text.splitlines() if line.startswith("    ") or not line.strip()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    for line in joined.splitlines():
        line = line.strip().split(" #")[0]
        if m := re.match(r'(\w+)="([^"]*)"', line):
            env[m[1]] = re.sub(r"\$(\w+)", lambda v: env.get(v[1], v[0]), m[2])
        for m in re.finditer(r"for (\w+) in ([^;]+);", line):
            env[m[1]] = m[2].split()[0].strip('"')
        line = re.sub(r"\$\{?(\w+)\}?", lambda v: env.get(v[1], v[0]), line)
        if m := re.search(r"(?:^|do |srun |; )(?:python|torchrun[^.]*?)\s+(\w+\.py)\s(.*?)(?:;|$)", line):
            if m[1] in STAGES and "$" not in m[2]:
                found.append((line, m[1], shlex.split(m[2])))
    return found


PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
CASES = [(page, *c) for page in PAGES for c in commands((ROOT / page).read_text())]


def test_the_pages_hold_the_commands_of_every_stage():
    assert {script for _, _, script, _ in CASES} == set(STAGES) and len(CASES) > 40


@pytest.mark.parametrize("page, line, script, argv", CASES, ids=[f"{c[0]}:{i}" for i, c in enumerate(CASES)])
def test_a_documented_command_parses_with_its_stages_flags(page, line, script, argv):
    try:
        STAGES[script].get_args_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{page}: {line}")
