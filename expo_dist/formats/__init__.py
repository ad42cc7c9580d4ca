"""File formats, read from headers alone: safetensors, torch .bin zips, the dtype table, positional reads, names."""

from .dtypes import DTYPES, extrapolatable, is_float, itemsize, known
from .folder import BIN_INDEX, BIN_SINGLE, CARD, INDEX, MANIFEST, SINGLE, WORK, is_side_file, shard_name, side_files
from .jsonsafe import one_line, shown
from .reader import LocalReader, Reader, pread_into
from .safetensors import FileHeader, Layout, TensorEntry, alignment_order, layout, parse_header, read_header
from .torchzip import read_bin_file, read_bin_header

__all__ = ["DTYPES", "extrapolatable", "is_float", "itemsize", "known",
           "BIN_INDEX", "BIN_SINGLE", "CARD", "INDEX", "MANIFEST", "SINGLE", "WORK", "is_side_file", "shard_name",
           "side_files",
           "one_line", "shown",
           "FileHeader", "Layout", "TensorEntry", "alignment_order", "layout", "parse_header", "read_header",
           "LocalReader", "Reader", "pread_into", "read_bin_file", "read_bin_header"]
