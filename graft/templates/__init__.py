"""Files `graft init` copies into a new project folder (package data, read with importlib.resources).

    run.yaml      the starter run's choices; `graft init` writes it resolved (every field, with its doc)
    own_loop.py   a minimal training loop of the user's own on graft's public API, written as train.py

Nothing here is imported by graft: own_loop.py is a template, run by the user from their folder.
"""
