"""Tests of README.md, docs/ and the documentation site."""
