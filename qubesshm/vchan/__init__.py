"""vchan transports for agent mode: the socket vchan (off Xen) and libvchan-xen.

``serve_socket``/``connect_socket`` speak the socket vchan's Unix stream (either
end, interoperable with QubesOS/qubes-core-vchan-socket); ``serve_xen`` and
``open_xen_server`` are the server end on Xen. All give a ``VchanStream``.
"""

from qubesshm.vchan.address import (
    DEFAULT_SOCKET_DIR,
    GUI_PORT,
    VchanAddress,
    check_domid,
    default_gui_domid,
    default_socket_dir,
    own_domid_from_env,
    socket_path,
)
from qubesshm.vchan.socketvchan import SocketListener, SocketStream, connect_socket, serve_socket
from qubesshm.vchan.stream import VchanClosed, VchanError, VchanListener, VchanStream
from qubesshm.vchan.xenvchan import (
    XenListener,
    XenVchanStream,
    load_libvchan,
    open_xen_server,
    serve_xen,
)

__all__ = [
    "DEFAULT_SOCKET_DIR",
    "GUI_PORT",
    "SocketListener",
    "SocketStream",
    "VchanAddress",
    "VchanClosed",
    "VchanError",
    "VchanListener",
    "VchanStream",
    "XenListener",
    "XenVchanStream",
    "check_domid",
    "connect_socket",
    "default_gui_domid",
    "default_socket_dir",
    "load_libvchan",
    "open_xen_server",
    "own_domid_from_env",
    "serve_socket",
    "serve_xen",
    "socket_path",
]
