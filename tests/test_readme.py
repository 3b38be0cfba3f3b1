"""The README's Python tour runs as written (offline, on the bundled planted model)."""
import re
from pathlib import Path


def test_readme_python_block_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'patch': 0" in out and "'patch': 14" in out and "'patch': 21" in out   # the planted sinks
