"""Model sources: a local folder or a Hub repo, resolved and indexed (name -> file, dtype, shape, byte range)."""

from .fetch import fetched, local_path, worker_env
from .hub import HubReader
from .hubretry import hub_error
from .index import ModelIndex, TensorRef, index_model
from .refs import Resolved, SourceSpec, is_ref, make_ref, parse_ref, parse_source, resolve

__all__ = ["fetched", "local_path", "worker_env", "HubReader", "hub_error", "ModelIndex", "TensorRef", "index_model",
           "Resolved", "SourceSpec", "is_ref", "make_ref", "parse_ref", "parse_source", "resolve"]
