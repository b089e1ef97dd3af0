"""The error types of inputs: ``ImageError`` for one input that cannot become an image (an error
row), ``ArchiveError`` for an archive whose structure cannot be scored at all."""

ERROR_KINDS = (
    "missing",  # path does not exist
    "unreadable",  # exists but cannot be read (permissions, is a directory, I/O error)
    "empty",  # zero bytes
    "truncated",  # header parsed but pixel data incomplete
    "not_image",  # bytes are not a supported image format
    "too_large",  # more pixels than the configured limit (decompression bomb guard)
    "unsupported_photometric",  # DICOM photometric interpretation other than MONOCHROME1/2
    "no_pixel_data",  # DICOM without a Pixel Data element
    "unsupported_transfer_syntax",  # DICOM compression no installed decoder handles
    "decode_failed",  # any other decoder failure
)


class ImageError(Exception):
    """An input that cannot be decoded; ``kind`` is one of ERROR_KINDS, ``reason`` is for humans."""

    def __init__(self, kind: str, reason: str):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason

    def __reduce__(self):  # survives pickling across Ray workers
        return (ImageError, (self.kind, self.reason))


class ArchiveError(ValueError):
    """An archive that cannot be scored as given (no such path, a list without its path column,
    Parquet without its key or image column, keys missing or repeated): raised before any
    model or Ray starts, one line for the user."""
