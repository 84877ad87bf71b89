"""The Python API: ``build_index`` and ``build_anchors``, ``open_index`` -> ``Index`` (the query side), and
``add``/``remove`` updates."""
