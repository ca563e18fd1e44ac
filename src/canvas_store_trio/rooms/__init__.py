"""Rooms and the sessions in them: a room's task, its frame handling and fan-out, its
saver and keep-alive, the manager that owns every room, and the admission of a socket
(the connect URL and the authorize hook)."""
