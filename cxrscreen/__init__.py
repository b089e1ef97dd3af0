"""cxrscreen: batch screening of chest X-rays (decode -> preprocess -> models -> Ray pipeline)."""

__version__ = "0.1.0"
