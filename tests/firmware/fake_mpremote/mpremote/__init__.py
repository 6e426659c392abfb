"""A stand-in for mpremote (put first on PYTHONPATH): records its arguments, fails on request."""
