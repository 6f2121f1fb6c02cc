"""oneword: a few images of a concept -> a new word for a text-to-image model.

Submodules are imported lazily by their users; importing `oneword` has no side effects.
"""

__version__ = "0.1.0"
