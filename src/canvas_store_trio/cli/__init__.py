"""``canvas-store-trio``: the ``serve``, ``export`` and ``import`` commands, and the demo page."""
