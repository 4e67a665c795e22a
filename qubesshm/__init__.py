"""qubesshm: a Wayland proxy that backs every shm buffer with Xen grant pages it owns.

Layout: ``wire`` parses and encodes bytes, ``objects`` tracks object lifetimes,
``relay`` validates and forwards messages (sans-IO ``session``) over sockets
(``server``, ``transport``, ``listener``), ``bench`` measures it.
"""

__version__ = "0.1.0"
