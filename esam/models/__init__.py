"""Model builders. Importing a module registers its models in ``MODELS``."""
from esam.models import resnet  # noqa: F401  (registers resnet18, resnet_digits)
from esam.models import wideresnet  # noqa: F401  (registers wrn28_10)
from esam.models import pyramidnet  # noqa: F401  (registers pyramidnet110)
from esam.models import imagenet  # noqa: F401  (registers resnet50, resnet101, timm)
from esam.models import mlp  # noqa: F401  (registers mlp)
from esam.models.registry import (
    MODELS,
    NATIVE_SHAPES,
    NativeShape,
    build_model,
    build_model_on,
    count_parameters,
    register_model,
)

__all__ = ["MODELS", "NATIVE_SHAPES", "NativeShape", "build_model", "build_model_on", "count_parameters", "register_model"]
