"""FP8 numerics, the FP8 linear layer, the module swap and calibration statistics."""
