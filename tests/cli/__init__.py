"""Tests of hessops.cli: the `hessops` command."""
