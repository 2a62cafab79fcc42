"""minivision: the small shared ground that every package of the project may import.

It imports only torch, numpy, pillow, safetensors and the standard library, and no other package
of the project, so the dependency arrows keep pointing one way:

    minivision  <-  minisam, miniflorence, convmae  <-  weights_convert, train  <-  bench, tests

Modules:
    checkpoint  the converted-checkpoint format (.safetensors with the config in the metadata)
"""
