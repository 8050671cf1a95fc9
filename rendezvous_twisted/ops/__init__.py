"""
Running the server: start-up services and graceful stop, systemd, TLS, metrics, logs and listeners.
"""
