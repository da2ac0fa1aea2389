"""Model builders. Importing a module registers its models in ``MODELS``."""
from esam.models import resnet  # noqa: F401  (registers resnet18, resnet_digits)
from esam.models.registry import MODELS, build_model, count_parameters, register_model

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
