"""The pipeline object: load a model under a policy, generate images, report what ran."""
