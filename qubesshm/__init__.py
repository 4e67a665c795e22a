"""qubesshm: a Wayland proxy that backs every shm buffer with Xen grant pages it owns.

Layout: ``wire`` parses and encodes bytes, ``objects`` tracks object lifetimes and
the two id spaces, ``relay`` validates and forwards messages (sans-IO ``session``)
over sockets (``server``, ``transport``, ``listener``), ``shm`` keeps client pools
and output buffers (sans-IO), ``pixels`` copies damage, ``grants`` makes, maps and
ends grants, ``bench`` measures it.
"""

__version__ = "0.1.0"
