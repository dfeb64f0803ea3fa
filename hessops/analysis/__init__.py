"""What users call on a curvature operator: extreme eigenpairs (:mod:`~hessops.analysis.spectrum`), spectral
densities, traces, log-determinants and basin volumes, per-block spectra, loss landscapes, eigenvectors on disk,
and sharpness tracking during training. Built on :mod:`hessops.linalg` and the public modules of
:mod:`hessops.operators`; the names users need are exported by :mod:`hessops` itself."""
