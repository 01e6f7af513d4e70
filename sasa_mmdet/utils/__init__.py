from .complexity import (ImageClassifier, build_model_from_cfg,
                         count_multiply_adds, count_parameters,
                         format_complexity, get_model_complexity, parse_shape)

__all__ = [
    'ImageClassifier', 'build_model_from_cfg', 'count_multiply_adds',
    'count_parameters', 'format_complexity', 'get_model_complexity',
    'parse_shape'
]
