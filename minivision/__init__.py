"""minivision: the small shared ground that every package of the project may import.

It imports only torch, numpy, pillow, safetensors and the standard library, and no other package
of the project, so the dependency arrows keep pointing one way:

    minivision  <-  minisam, miniflorence, convmae  <-  weights_convert, train  <-  bench, tests

Modules:
    checkpoint    the converted-checkpoint format (.safetensors with the config in the metadata),
                  official checkpoints, and `resolve_weights` (a run folder -> its weights file)
    model_folder  a model folder as Hugging Face downloads it
    configs       the model configs' shared checks (positive sizes, widths divisible by heads), one line each
    images        the one image reader (every PIL mode, EXIF; alpha dropped or composited onto white)
    files         writing files whole (temporary file, fsync, rename; normal permissions)
    cli           the command lines' plumbing: one-line errors, devices, inputs (--skip-bad), outputs
    onnx          the ONNX export helpers (the [onnx] extra is imported only inside them)
    passes        large inputs in slices (`in_passes`): arrays the allocator reuses instead of fresh pages
    memory        glibc keeps freed memory for the next step (`reuse_freed_memory`, set by the command lines)
"""
