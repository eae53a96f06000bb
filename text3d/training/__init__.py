"""The optimisation loop of `text3d generate`: run folders, checkpoints, resume and interruption."""
