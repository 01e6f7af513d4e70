from .san import SAN
from .sasa_resnet import (PretrainedMismatchError, ResNetArgumentError,
                          SASAResNet, UnknownDepthError)

__all__ = [
    'PretrainedMismatchError', 'ResNetArgumentError', 'SAN', 'SASAResNet',
    'UnknownDepthError'
]
