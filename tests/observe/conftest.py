from tests.control.conftest import cluster_factory  # noqa: F401  (shared with the control-plane tests)
