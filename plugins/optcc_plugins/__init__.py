"""optcc's built-in plugins.

Each module is registered through the ``optcc`` entry-point group in optcc's own
pyproject.toml, exactly like a third-party plugin, and uses only optcc's public API.
"""
