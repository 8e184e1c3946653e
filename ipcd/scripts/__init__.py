"""Console entry points: ipcd, pong, websocketc."""
