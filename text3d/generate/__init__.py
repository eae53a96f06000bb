"""`text3d generate`: the 3D optimisation loop (random cameras -> render -> guidance -> Adam), its
typed config, run folders, resume, previews and the export at the end of a run."""
