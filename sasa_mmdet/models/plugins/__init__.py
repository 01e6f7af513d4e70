"""ResNet plugins, registered in mmengine's root ``MODELS``."""
from .se import SEPlugin

__all__ = ['SEPlugin']
