from .bf16_amp_optim_wrapper import BF16AmpOptimWrapper, enable_amp

__all__ = ['BF16AmpOptimWrapper', 'enable_amp']
