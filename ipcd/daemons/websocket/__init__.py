"""
websocketd, the WebSocket protocol daemon: its service and halves, the
bridge to libipc, its frames, bounds and the websocketc page it serves.
"""

# Its configuration section, and its name in status and metrics.
SECTION = "websocketd"
