"""Window images for agent mode: a surface tree rendered into a grant area as the
Qubes GUI daemon reads it (XRGB8888, stride 4·width), with its damage.

``render`` composites and tracks damage, ``mapping`` maps surface pixels to
buffer pixels (viewport, transform, scale) and back, ``blend`` is the
premultiplied-alpha OVER.
"""
