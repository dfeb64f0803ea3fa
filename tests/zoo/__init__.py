"""Tests of hessops.zoo: datasets, models and language models."""
