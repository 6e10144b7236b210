"""crystalstudio: explore learned 3-D crystal representations.

Importing the package loads no Qt, pyvista or pymatgen; the layers are

``core`` (numpy, scipy, torch) <- ``io`` (pymatgen) <- ``session`` <- ``render``/``gui``/``cli``.
"""

__version__ = "0.1.0"
