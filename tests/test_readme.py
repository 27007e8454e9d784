"""README stays true: its Python example runs and reaches a plausible fit; its commands match .ci/run."""

import pathlib
import re


ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_readme_example_runs_and_fits_the_digits():
    namespace = {}
    exec(compile(_python_blocks()[0], "README.md", "exec"), namespace)
    acc = float(namespace["fpbma"].metrics.accuracy(namespace["log_pred"], namespace["y"]))
    # Bayesian logistic regression on the 1,797 digits reaches well above chance (0.1) in 300 steps.
    assert acc > 0.85, acc
    assert int(namespace["state"].num_skipped) == 0


def test_ci_runs_the_readme_test_command_verbatim():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)```", readme, re.S)[0]
    lines = [l.strip() for l in commands.splitlines() if l.strip() and not l.strip().startswith("#")]
    assert len(lines) == 2, "README must state exactly two set-up commands"
    assert lines[1] in (ROOT / ".ci" / "run").read_text()
