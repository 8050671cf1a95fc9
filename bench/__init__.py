"""
The benchmark of rendezvous-twisted: a lean asyncio HTTP/1.1 load generator,
the scenarios of issue 6 (exchange, read-heavy, parked, churn, floor), and a
runner that starts the servers itself, pinned to one core with the client on
the other.

Run C{python -m bench --help}.  Nothing here is imported by the server.
"""
