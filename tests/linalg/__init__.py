"""Tests of hessops.linalg: where the Lanczos basis lives, and resumable runs."""
