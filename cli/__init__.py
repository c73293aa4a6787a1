"""`twinserve`, the command line: the composition root that wires the packages' commands together.

Each package registers its own commands (``register(sub)``); only this package imports them all, so the
arrows between packages point one way (docs/ARCHITECTURE.md, "Packages"; tests/test_imports.py).
"""
