"""One worker module per peer (`<name>_peer.py`), run by `benchmarks.peers.worker`."""
