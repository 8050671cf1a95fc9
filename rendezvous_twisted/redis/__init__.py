"""
The Redis store and its RESP client.
"""
