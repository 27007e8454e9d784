"""Sphinx configuration of the fpbma documentation (offline: no intersphinx, no remote fetches)."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "fpbma"
author = "fpbma authors"
copyright = "fpbma authors"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "README.md"]

# Google-style docstrings.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True          # "Attributes:" as fields, so NamedTuple fields are not described twice
napoleon_use_rtype = False

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
autosummary_generate = False

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4

# Doctest: pages' code blocks run on the CPU, in float32, with no network.
doctest_global_setup = """
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
"""

html_theme = "alabaster"
html_static_path = []
html_title = "fpbma"

# Only the explicit doctest directives of the pages run under `-b doctest`; the docstrings' own
# `>>>` examples run with their module's globals under `pytest --doctest-modules fpbma`.
doctest_test_doctest_blocks = ""


def _escape_bars(line: str) -> str:
    """`|x|`, `log|Σ|` are math in these docstrings, never reST substitutions: escape the bars
    outside ``inline literals``."""
    parts = line.split("``")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("|", "\\|")
    return "``".join(parts)


def _plain_text_bars(app, what, name, obj, options, lines):
    literal_indent = None
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if literal_indent is not None:
            if stripped and indent <= literal_indent:
                literal_indent = None
            else:
                continue
        if stripped.startswith((">>>", "...")):
            continue
        if "|" in line:
            lines[i] = _escape_bars(line)
        if line.rstrip().endswith("::"):
            literal_indent = indent


def _top_level_alias(app, env, node, contnode):
    """Resolve ``fpbma.fpbma``, ``fpbma.DiagGaussian`` … (re-exports of the top-level package) to the
    objects documented in :mod:`fpbma.transforms` and :mod:`fpbma.posterior`."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    head, _, name = target.rpartition(".")
    if head != "fpbma":
        return None
    from fpbma import posterior, transforms

    for module in (posterior, transforms):
        if name in module.__all__:
            return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                                      f"{module.__name__}.{name}", node, contnode)
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _plain_text_bars)
    app.connect("missing-reference", _top_level_alias)
