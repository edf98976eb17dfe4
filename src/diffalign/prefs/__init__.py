"""Preference data: the store (SQLAlchemy), its records, pairs in memory, dataset formats, simulation."""

from diffalign.prefs.pairs import PreferencePairs
from diffalign.prefs.records import BadRow, ImportReport, NewComparison, StoredComparison
from diffalign.prefs.store import ImageInfo, ImportAborted, PreferenceStore, StoreError

__all__ = [
    "BadRow",
    "ImageInfo",
    "ImportAborted",
    "ImportReport",
    "NewComparison",
    "PreferencePairs",
    "PreferenceStore",
    "StoreError",
    "StoredComparison",
]
