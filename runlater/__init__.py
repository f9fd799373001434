"""runlater: a self-hostable service that runs HTTP requests later."""

__version__ = "0.1.0"
