"""
udpd, the UDP protocol daemon: its service and halves, its sessions, its
wire format and its cookies; here, the names its modules share.
"""

SCHEME = "udp"
SECTION = "udpd"
# What a UDP read takes: any datagram, so that oversized ones are seen
# (and counted) rather than cut by the kernel to fit a smaller buffer.
READ_SIZE = 65536
