"""The embedded synthetic world: coloured primitives and front/back objects, rendered by the
project's own renderer code, captioned like `text3d generate` prompts. It trains the embedded
teacher and the judge, and gives the ground truth that `text3d eval` scores against."""
