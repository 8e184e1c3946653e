"""Console entry points: ipcd, pong."""
