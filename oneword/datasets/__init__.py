"""Data for oneword: the miniature world, its WebDataset shards, and concept suites.

- `oneword.datasets.world`: the procedural shapes world (scenes, renderer, captions,
  held-out concepts, an infinite `WorldStream`).
- `oneword.datasets.shards`: write world shards and read any WebDataset/img2dataset shards
  safely (no pickle decoding).
- `oneword.datasets.suite`: the concept-suite folder format (and DreamBooth's layout).

Nothing is imported here so that `import oneword.datasets` stays cheap.
"""
