"""The index engine: fixed-size keys to fixed-size values on disk.

Modules, bottom up: ``framing`` (file headers, checksums), ``log`` (append-only
log of recent bindings), ``datafile`` (sorted data file with fan-out and
lookup), ``merge`` (log + data file -> next data file), ``layout`` (file names
and generations), ``lock`` (the writer lock) and ``index`` (the engine the
stores use, behind the interface of ``interface``).
"""
