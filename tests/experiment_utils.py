"""The tiny experiment config the end-to-end tests share, with dotted-name overrides."""

from experiments.configs import tiny


def tiny_config(workdir, corruptions: str = "none", **overrides):
    """``experiments/configs/tiny.py`` writing to ``workdir``; ``overrides`` maps "section.field" to a value."""
    c = tiny.get_config()
    c.workdir = str(workdir)
    c.eval.corruptions = corruptions
    for name, value in overrides.items():
        section, _, field = name.rpartition(".")
        (c[section] if section else c)[field] = value
    return c
