"""SENG tunnels: sans-I/O DTLS and setup state machines, and their asyncio/TUN adapters."""
