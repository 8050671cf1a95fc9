"""
rendezvous-twisted: a rendezvous server for the Matrix "log in with a QR
code" handshake (MSC3886 and MSC4108), with long-polling, on Twisted and Klein.
"""

__version__ = "0.1.0"
