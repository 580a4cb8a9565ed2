"""Package data of an installed metaqnn: presets/, solvers/ and prototxt_templates/ (see pyproject.toml).

In a checkout these are the top-level folders themselves; :mod:`metaqnn.resources` decides which.
"""
