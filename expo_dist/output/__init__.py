"""The output: lock, journal, staged shards, commit (manifest, card, index last), behind one writer interface."""

from .finalize import create_shards, finish, model_card, work_dir
from .journal import Journal
from .lock import OutputLock
from .manifest import Manifest, RunInfo
from .owned import clear_owned, record_names
from .writer import LocalWriter, OutputWriter

__all__ = ["create_shards", "finish", "model_card", "work_dir", "Journal", "OutputLock", "Manifest", "RunInfo",
           "clear_owned", "record_names", "LocalWriter", "OutputWriter"]
