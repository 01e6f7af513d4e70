from .san import SAN
from .sasa_resnet import PretrainedMismatchError, SASAResNet

__all__ = ['PretrainedMismatchError', 'SAN', 'SASAResNet']
