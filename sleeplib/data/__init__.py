"""Data access: the Sleep-EDF records table, downloads, raw nights, preparation, datasets.

Only the light modules are re-exported here (no mne import); the others are imported from their
submodules, e.g. ``from sleeplib.data.prepare import prepare``.
"""

from sleeplib.data.records import SUBSETS, parse_nights, parse_subjects, records_table, select_records

__all__ = ["SUBSETS", "parse_nights", "parse_subjects", "records_table", "select_records"]
