"""The bundled miniature SD3: its shape world, the judge, tiny test models and the training script."""
