"""Evaluation: the judge classifier, the Fréchet distance in its feature space, and image scoring.

  judge.py         Judge (object / colour / view heads + features), train_judge, save/load
  frechet.py       Fréchet distance between two feature sets
  score_images.py  parse prompts, score_predictions, score a `text3d sample` folder (scores.json)
  cli.py           `text3d eval images DIR`
"""
