from .bf16_amp_optim_wrapper import BF16AmpOptimWrapper, bf16_autocast, enable_amp

__all__ = ['BF16AmpOptimWrapper', 'bf16_autocast', 'enable_amp']
