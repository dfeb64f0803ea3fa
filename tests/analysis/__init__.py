"""Tests of hessops.analysis: spectra, estimators, blocks, landscapes and trackers against exact answers."""
