"""The agent wing: the process beside each ``spdk_tgt`` (``csi-spdk agent``).

The only way the controller reaches a remote target. Imports the package root
and ``spdk/``; never ``controller/``, ``node/`` or ``sim/``.
"""
