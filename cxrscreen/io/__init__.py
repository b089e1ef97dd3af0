"""Reading and decoding: input discovery (folders, list files, Parquet) and image decoding."""

from cxrscreen.io.errors import ImageError
from cxrscreen.io.decode import DecodeOptions, Decoded, decode_image, read_bytes
from cxrscreen.io.sources import InputItem, list_inputs, DEFAULT_LABEL_MAP

__all__ = [
    "ImageError", "DecodeOptions", "Decoded", "decode_image", "read_bytes",
    "InputItem", "list_inputs", "DEFAULT_LABEL_MAP",
]
