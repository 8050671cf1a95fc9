"""
The core: config, conditions, the store contract and the memory store, the
budget. Nothing here knows of HTTP or Klein.
"""
