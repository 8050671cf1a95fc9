"""
The hardened HTTP wire (HTTP/1.1 and HTTP/2), the Site, the answers every
response carries, and who a client is.
"""
