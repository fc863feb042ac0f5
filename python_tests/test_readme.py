"""README.md's example runs as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert re.search(r"loss [0-9.]+, codes used [0-9]+ of 64", out), out


def test_readme_is_a_product_page_of_at_most_300_lines():
    # The measurement narrative lives in benchmarks/README.md and experiments/README.md.
    assert len(README.read_text().splitlines()) <= 300
