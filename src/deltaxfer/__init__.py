"""deltaxfer: live migration of CRIU-checkpointed processes with page-level deltas."""

__version__ = "0.1.0"

PAGE_SIZE = 4096
