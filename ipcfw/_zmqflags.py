"""pyzmq's constants as plain ints, for hot paths.

pyzmq's constants are enums: ``sock.get(zmq.EVENTS) & zmq.POLLIN`` builds enum objects on every
call, which costs more than the getsockopt itself. Hot loops use these instead.
"""

import zmq

EVENTS = int(zmq.EVENTS)
RCVMORE = int(zmq.RCVMORE)
POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
POLLOUT = int(zmq.POLLOUT)
POLLERR = int(zmq.POLLERR)
