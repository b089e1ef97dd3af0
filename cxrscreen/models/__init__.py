"""Models: one registry (``build_model(name, ...)``) plus safe checkpoints."""

from cxrscreen.models import compact, ensemble, papers, torchvision_nets, unet  # noqa: F401 - register the models
from cxrscreen.models.registry import REGISTRY, build_model, check_input_size, get_entry, list_models, register
from cxrscreen.models.checkpoint import LoadedModel, load_model, save_checkpoint

__all__ = ["REGISTRY", "build_model", "check_input_size", "get_entry", "list_models", "register",
           "LoadedModel", "load_model", "save_checkpoint"]
