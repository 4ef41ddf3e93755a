"""Detection data: the built-in synthetic Shapes dataset (`shapes`) and grain batching (`pipeline`).

A source is anything with `__len__` and `__getitem__(i)` returning {"image": uint8 [H, W, 3],
"boxes": float32 [G, 4] corners (xmin, ymin, xmax, ymax) in [0, 1], "labels": int32 [G] in 1..C,
"difficult": bool [G]}.
"""
