"""Training data for the tiny model: the captioned-shapes data set (shapes.py) and its pixel checker (checker.py)."""
from .shapes import (BACKGROUNDS, COLOURS, EXTREME_BACKGROUNDS, HELDOUT, NEW_SHAPES, PALETTE, SHAPES, ShapesDataset,
                     all_combinations, caption, combinations, extreme_background_combinations, heldout_combinations,
                     new_shape_combinations, parse_caption, render, train_combinations)
from .checker import Reading, check

__all__ = ["BACKGROUNDS", "COLOURS", "EXTREME_BACKGROUNDS", "HELDOUT", "NEW_SHAPES", "PALETTE", "SHAPES",
           "ShapesDataset",
           "all_combinations", "caption", "combinations", "extreme_background_combinations", "heldout_combinations",
           "new_shape_combinations", "parse_caption", "render", "train_combinations",
           "Reading", "check"]
