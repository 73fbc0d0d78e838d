"""The SMTP protocol, sans-IO: bytes in, events and bytes out; no sockets, no asyncio, no clocks."""
