"""The controller wing: CSI Identity + Controller over SPDK targets.

``service.py`` (volumes, publish, capacity; steps in ``create.py``,
``delete.py``, ``expand.py``, ``refusals.py``) and ``snapshots.py`` are the CSI
Controller service; ``target.py`` is the controller's model of one SPDK target,
``export.py`` its NVMe/TCP export strategy, ``placement.py`` the placement
policy, ``config.py`` the config file, ``main.py`` the process wiring.
Imports the package root and ``spdk/``; never ``node/``, ``agent/`` or ``sim/``.
"""
