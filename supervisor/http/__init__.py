"""The request path: validate, route, admit, queue, forward to a replica, relay the answer, account for it.

`RequestPath.handle` answers every request it accepts exactly once: the worker's answer, or a typed
error from errors.py. A request's own facts travel together in one `Call` record (call.py); admission
(admit.py), waiting and retrying (dispatch.py), one attempt on one replica (exchange.py) and the HTTP
framing (framing.py) each own one part of its way.
"""

from .path import RequestPath

__all__ = ["RequestPath"]
