"""sleeplib: the shared library of the sleep-staging workbook.

The notebooks in ``notebooks/`` tell the story; everything they use twice lives here.
Submodules are imported lazily so that training code runs where MNE is absent
(``sleeplib.models`` and ``sleeplib.train`` never import ``mne``).
"""

__version__ = "0.1.0"

STAGES = ("W", "N1", "N2", "N3", "REM")
"""Label order used everywhere: ``y == 0`` is wake, ``y == 4`` is REM."""
