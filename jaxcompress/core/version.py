"""The library's version, in a module low enough for every layer to read it."""

__version__ = "0.1.0"
