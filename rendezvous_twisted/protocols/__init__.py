"""
One Klein module per protocol generation, each mapping its routes to the store contract.
"""
