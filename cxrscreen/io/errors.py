"""The one error type raised for any input that cannot become an image."""

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
