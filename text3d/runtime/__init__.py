"""The runtime layer, at the bottom of text3d: what every long-running job needs, whatever it trains.

  atomic.py      files written to a temporary name and renamed
  checkpoint.py  torch checkpoints, atomic, with one-line errors when missing or corrupt
  config.py      the one config system (typed dataclasses, YAML, key=value overrides)
  loop.py        the one training-loop helper: progress, checkpoint cadence, NaN policy, Ctrl-C
  preview.py     image grids as PNG
  progress.py    a progress bar on a terminal, plain lines otherwise
  registry.py    registries by name (guidance, stages, 2D methods) filled from Python entry points
  resources.py   files shipped inside the package (configs, embedded teacher and judge, prompt sets)
  run_folder.py  run-folder naming and creation
  seed.py        seeding and RNG state for exact resume
  signals.py     Ctrl-C / SIGTERM as a stop request; Interrupted
"""
