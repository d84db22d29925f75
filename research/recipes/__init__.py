"""
What the lab adds to the bundle's training for its protocols, put in by config overlays (``research/configs/``), never
by the bundle itself: :mod:`research.recipes.scribbles` simulates background strokes in dense ground truth.
"""
