"""One analysis: the dream loop, its result and the checks on it (DESIGN.md, "Layout")."""
