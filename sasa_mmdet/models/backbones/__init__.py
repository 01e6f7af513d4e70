from .sasa_resnet import PretrainedMismatchError, SASAResNet

__all__ = ['PretrainedMismatchError', 'SASAResNet']
