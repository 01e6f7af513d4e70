from .synthetic_shapes import (SHAPE_CLASSES, SHAPE_CLASSIFICATION_CLASSES,
                               SyntheticShapesDataset,
                               generate_synthetic_shape_classes,
                               generate_synthetic_shapes)

__all__ = [
    'SHAPE_CLASSES', 'SHAPE_CLASSIFICATION_CLASSES', 'SyntheticShapesDataset',
    'generate_synthetic_shape_classes', 'generate_synthetic_shapes'
]
