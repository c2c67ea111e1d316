"""The bottom layer: file and SQLite io, the error classes with their exit codes, the cost ledger.

Nothing here imports any other package of the project, so every package may import it.
"""
