"""Peer servers of benchmarks/peers.py: the same MiniLM behind LitServe and behind plain Ray Serve."""
