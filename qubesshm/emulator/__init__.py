"""``qubesshm guid-emulator``: the dom0 side of the Qubes GUI protocol on one machine.

``daemon``: a sans-IO model of qubes-guid; ``xwindows``: its X11 side through xcffib;
``main``: the process (vchan client, hypervisor mapper, X connection on one asyncio
loop); ``cli``: the command's options.
"""
