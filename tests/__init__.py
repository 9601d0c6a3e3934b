"""imgindex's tests: a package, so that conftest and helpers load once each."""
