"""precogx-sidecar: durable forwarding of Dify interactions to PrecogX."""

__version__ = "0.1.0"
