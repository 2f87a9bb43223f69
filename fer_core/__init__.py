"""fer_core: the small core of the fer toolkit (interfaces, registry, recipes, engine, CLI).

The core knows no concrete technique: every backbone, head, loss, augmenter, dataset reader,
schedule and tracker is a plugin found through the ``fer.plugins`` entry-point group.
"""

__version__ = "0.1.0"
