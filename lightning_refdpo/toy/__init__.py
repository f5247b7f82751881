"""The toy world: a small text-to-image setting whose preferences are known exactly.

``world`` (scenes, captions, the prompt splits), ``reward`` (``ToyReward``, the known reward),
``evaluate`` (attribute summaries, win rates with confidence intervals) and ``demo`` (``make demo``).
"""
