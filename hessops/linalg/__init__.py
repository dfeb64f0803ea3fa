"""Lanczos and what it needs, knowing no model: the recurrence (:mod:`~hessops.linalg.lanczos`), its block and
thick-restarted form (:mod:`~hessops.linalg.block_lanczos`), where its basis lives (:mod:`~hessops.linalg.basis`),
resumable runs (:mod:`~hessops.linalg.checkpoint`), Gauss quadrature of spectral measures
(:mod:`~hessops.linalg.quadrature`) and projections off found eigenvectors (:mod:`~hessops.linalg.deflation`).
Every function takes a CoLA operator; none imports the operators, the zoo or the analysis above it
(tests/test_layers.py)."""
