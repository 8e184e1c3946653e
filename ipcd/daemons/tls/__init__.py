"""
tlsd, the TLS protocol daemon: its service and halves, its relay codec, its
key material and PSK files.
"""
