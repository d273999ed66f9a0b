"""Services layer: the `uvmbus` CLI and the daemons (net bridge, block export).

- :mod:`~uvmbus.services.cli`        the command line (one module per command group)
- :mod:`~uvmbus.services.daemon`     run directory, pidfile, control socket, signals, watchdog
- :mod:`~uvmbus.services.sdnotify`   READY/STATUS/WATCHDOG/STOPPING without libsystemd
- :mod:`~uvmbus.services.metrics`    Prometheus text format: registry, HTTP endpoint, textfile
- :mod:`~uvmbus.services.logs`       text (journald-aware) or JSON-lines logging
- :mod:`~uvmbus.services.status`     ``uvmbus status``: devices, bindings, daemons, CPU/RSS
- :mod:`~uvmbus.services.persist`    boot-time bindings, installing the systemd units
- :mod:`~uvmbus.services.netbridge`  ``uvmbus net bridge`` (with :mod:`~uvmbus.tap`,
  :mod:`~uvmbus.services.hooks`)
- :mod:`~uvmbus.services.blkexport`  ``uvmbus blk export`` (nbdkit runs
  :mod:`~uvmbus.services.nbdplugin`)
- :mod:`~uvmbus.services.demo`       ``uvmbus demo``

See docs/services.md and docs/deploy.md.
"""
