"""What a run folder shows: the run page (index.html with model-viewer), training curves, and the local server of `text3d view`."""
