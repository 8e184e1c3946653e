# Sphinx configuration for ipcd's documentation.
#
#     python3 -m pip install '.[docs]'
#     sphinx-build -W -b html docs docs/_build/html
#
# No extension needs the network (no intersphinx), and nothing imports ipcd.

project = "ipcd"
author = "the ipcd authors"
copyright = "the ipcd authors"
release = "0.1.0"

extensions: list[str] = []
root_doc = "index"
exclude_patterns = ["_build", "operations-*.rst"]  # included by operations.rst
highlight_language = "none"
pygments_style = "sphinx"

html_theme = "alabaster"
html_static_path: list[str] = []
