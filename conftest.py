"""What several test files share: the "Use it in your code" block of a method file's docstring, extracted once."""
import textwrap

import pytest


def use_it_block(module):
    """The code of module.__doc__'s "Use it in your code:" block: the indented lines after that line, up to the
    first non-blank line that is not indented, dedented."""
    lines = module.__doc__.split("\n")
    block = []
    for line in lines[lines.index("Use it in your code:") + 1:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line)
    return textwrap.dedent("\n".join(block)).strip() + "\n"


@pytest.fixture
def run_use_it(tmp_path, monkeypatch):
    """run_use_it(module) -> the namespace after the module's Use-it block ran as printed, in an empty folder."""
    def run(module):
        monkeypatch.chdir(tmp_path)
        code = use_it_block(module)
        assert 10 <= len(code.splitlines()) <= 22, code               # a short loop, as lightly's examples
        namespace = {}
        exec(compile(code, f"{module.__name__}.__doc__ (Use it in your code)", "exec"), namespace)
        return namespace
    return run


def assert_scores_follow_the_image(main, out, spec="digits", x=None):
    """The finished run in `out` of the script whose main() is `main`: `--score SPEC` (its data set's test split,
    every class) reproduces every row of every CSV the run wrote to scores/ exactly (the same image name, the
    same cells), and through harness.Scorer every image of x (default: SPEC's first 12 test images) gets the same
    scores alone, at another position and among other images."""
    import csv
    import os
    import harness
    import torch
    main(["--out", str(out), "--score", spec])
    read = lambda path: {r["image"]: r for r in csv.DictReader(open(path))}
    scored = read(os.path.join(out, "scored", harness.csv_name(spec)))
    for name in os.listdir(os.path.join(out, "scores")):
        rows = read(os.path.join(out, "scores", name))
        assert rows and all(scored[image] == row for image, row in rows.items()), name
    scorer = harness.Scorer.load(str(out))
    x = harness.load_dataset(spec, train=False)[0][:12] if x is None else x
    whole = scorer.scores(x)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    companions = torch.cat([x.flip(0)[:5], x[order]])
    among = scorer.scores(companions)
    for i in (0, len(x) - 1):
        alone = scorer.scores(x[i:i + 1])
        for k in whole:
            assert torch.allclose(alone[k][0], whole[k][i], rtol=1e-5, atol=1e-6), (k, i)
    for k in whole:
        assert torch.allclose(among[k][5:], whole[k][order], rtol=1e-5, atol=1e-6), k
