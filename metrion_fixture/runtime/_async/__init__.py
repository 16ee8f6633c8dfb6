"""The async driver and store calls: the one source the sync ones in ``_sync`` are generated from.

Edit these files only; ``python .ci/unasync.py`` writes ``runtime/_sync`` from them, and
``.ci/run`` checks that the generated files are up to date.
"""
