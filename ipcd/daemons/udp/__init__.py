"""
udpd, the UDP protocol daemon: its service and halves, its sessions, its
wire format and its cookies.
"""

SCHEME = "udp"
SECTION = "udpd"
