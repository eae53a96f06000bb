"""Evaluation: the judge classifier, the Fréchet distance in its feature space, and image scoring.

  judge.py            Judge (object / colour / view heads + features), train_judge, save/load
  frechet.py          Fréchet distance between two feature sets
  score_images.py     parse prompts, score_predictions, score a `text3d sample` folder (scores.json)
  score_run.py        render a run's exported mesh from 8 views and score it (eval.json)
  clip_rprecision.py  CLIP R-precision of rendered views against distractor prompts (optional, needs a CLIP model)
  cli.py              `text3d eval images DIR`, `text3d eval run RUN_DIR`
"""
