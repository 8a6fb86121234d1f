"""The index engine: fixed-size keys to fixed-size values on disk.

Modules, bottom up: ``filesystem`` (the seam of every creation, fsync,
rename and unlink), ``framing`` (file headers, checksums), ``log``
(append-only log of recent bindings), ``filter`` and ``run`` (immutable runs
sorted by key, with a Bloom filter and an index), ``levels`` (which runs a
store holds, which to merge), ``runstack`` (a store's runs as one value),
``selection`` (what a GC keeps), ``datafile`` (the format before runs,
read and converted), ``layout`` (file names and generations), ``lock`` (the
writer lock) and ``index`` (the engine the stores use, behind the interface
of ``interface``). Tools reach an index directory through ``files``; the
optional C paths are chosen in ``accel``.
"""
