"""The shared contracts below both halves: user-facing errors, image IO, the manifest.

No torch and no CLI here: `synthesis/` and `discriminator/` import this package, and
`pipelines/` (the CLI and stage glue) imports all three, so imports only run downward.
"""
