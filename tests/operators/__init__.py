"""Tests of hessops.operators: each operator's products against dense float64 references."""
