"""The web app (`text3d app`): Gradio front end over `text3d generate`; optional extra `.[app]`."""
