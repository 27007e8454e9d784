"""The tiny experiment config the end-to-end tests share, with dotted-name overrides."""

from experiments.configs import tiny


def tiny_config(workdir, corruptions: str = "none", **overrides):
    """``experiments/configs/tiny.py`` writing to ``workdir``; ``overrides`` maps "a.b.field" to a value."""
    c = tiny.get_config()
    c.workdir = str(workdir)
    c.eval.corruptions = corruptions
    for name, value in overrides.items():
        *sections, field = name.split(".")
        node = c
        for section in sections:
            node = node[section]
        node[field] = value
    return c


def first_table(md: str) -> list:
    """The data rows of the first Markdown table of a report (results.md / flatness.md)."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows
