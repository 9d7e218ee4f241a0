"""Sky Port: one authenticated API between the software that produces work and the machines that run it."""

__version__ = "0.1.0"
