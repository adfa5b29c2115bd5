"""gaincell: analog gain-cell in-memory-computing attention for language models.

Stages (each a subpackage or module, data flowing one way):
device -> fit -> attention -> model -> train -> adapt -> evaluate -> hardware -> figures.
"""

__version__ = "0.1.0"
