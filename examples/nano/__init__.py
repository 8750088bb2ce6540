"""How Lumina-mGPT-nano was built: the synthetic shapes data (`shapes`), its VQGAN trainer (`train_vqgan`), the
build steps around the training recipes (`build`: data, init, grow, export) and its evaluation (`evaluate`).
Run from the repository root, e.g. `python -m examples.nano.build data ...`; recipes/nano/README.md has the sequence.
"""
