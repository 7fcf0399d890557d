"""The node wing: CSI Identity + Node on each Kubernetes node.

``service.py`` is the CSI Node service (its RPCs' steps in ``stage.py``,
``publish.py``, ``stats.py``, ``expand.py``, ``capability.py``,
``records.py``, ``rekey.py`` with ``acks.py``: re-keying on republish and
its acknowledgement); ``initiator.py`` the NVMe/TCP connect
strategy (symmetric to ``controller/export.py``), ``mount.py`` filesystems and
mounts, ``readonly_block.py`` read-only raw block publishes, ``topology.py``
local NVMe SSD discovery, ``blkid.py`` and ``sysfs.py`` the low-level probes,
``main.py`` the process wiring. Imports the package root and ``spdk/``; never
``controller/``, ``agent/`` or ``sim/``.
"""
