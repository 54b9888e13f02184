"""The README's promises about set-up hold: CI runs exactly its test command; its examples run."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert block, "README must open with a bash block of the two set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command():
    run_cmd, test_cmd = readme_commands()[:2]
    assert "pytest" in test_cmd and "torch==2.13.0" in run_cmd and "torch==2.13.0" in test_cmd
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    # The README's test command runs first and alone; the optional stacks' steps follow it.
    assert ci_lines[0] == test_cmd
    assert ci_lines[1] == "deactivate" and all(test_cmd not in line for line in ci_lines[1:])
    assert any(".ci/steps/" in line for line in ci_lines[2:])


def test_quickstart_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "GlmForCausalLM" in result.stdout and "loss" in result.stdout


def test_readme_python_examples_run():
    """Every ```python block of the README runs as written (they use the bundled model, offline)."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, f"README python example {i + 1} failed:\n{code}\n{result.stderr}"
