"""qubesshm as a Wayland compositor: apps connect to it, with no compositor upstream.

``core.Compositor`` is the sans-IO compositor (one ``client.ClientCore`` per
connection, each request handled by the module of its interface); ``server``
drives it from asyncio. What it shows goes to a ``shell.Shell`` (the agent),
as ``scene.SceneNode`` trees of committed surfaces.
"""
