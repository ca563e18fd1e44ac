"""Bytes on the wire: our WebSocket (frame codec, h11 handshake, read poller), the
listeners for it and for trio-websocket, and the plain HTTP answers beside them."""

from ._handshake import HandshakeRequest as HandshakeRequest
from ._listener import serve_websocket_stream as serve_websocket_stream
from ._listener import serve_websockets as serve_websockets
