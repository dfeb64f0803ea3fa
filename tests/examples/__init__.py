"""Tests of examples/: each example run as a user runs it."""
