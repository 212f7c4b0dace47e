"""Benchmarks of every backend, in one place: one timer, one row format, one JSON schema, plots.

- :mod:`gspn.bench.core`: the timer (:func:`median_seconds`), the memory floor (:func:`copy_bandwidth`,
  :func:`scan_bytes`), the row format (:func:`row`), the results file (:func:`save_results`).
- :mod:`gspn.bench.scans`: the scan operator per backend against the reference and the memory floor.
- :mod:`gspn.bench.models`: layers and whole networks per backend (latency, scan share, peak memory).
- :mod:`gspn.bench.plot`: PNG plots beside the JSON.
- :mod:`gspn.bench.runner`: ``gspn bench`` runs them all.
"""
