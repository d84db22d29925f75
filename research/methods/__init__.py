"""The methods of the accuracy benchmark, each a ``fit_predict(split, ratio, settings)`` (:mod:`research.runner`)."""
