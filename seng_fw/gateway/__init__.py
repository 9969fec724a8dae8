"""The gateway: admission, address leases and forwarding between tunnels and the TUN."""
