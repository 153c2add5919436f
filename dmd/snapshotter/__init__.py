"""dmd-snapshotter: containerd's snapshots API served from dmd's volumes.

A separate process and a client of dmd's D-Bus API only; its gRPC
dependency is the optional extra ``dmd[snapshotter]``.
"""
