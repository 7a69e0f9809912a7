"""What the proxy tells about itself: Prometheus metrics and the JSON view, the access log."""
