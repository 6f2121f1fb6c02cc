"""The concept encoder: a few images -> a new word's embedding rows in one forward pass.

- `oneword.encoder.features`: frozen CLIP image towers (world, transformers, open_clip).
- `oneword.encoder.model`: the encoder head, its file format and `encode_concept`.
- `oneword.encoder.data`: concept sets for pretraining (the world, shards, image folders).

Pretraining is the root script `train_encoder.py`. Nothing heavy is imported here.
"""

from .model import ConceptEncoder, EncoderConfig, encode_concept, load_encoder, save_encoder

__all__ = ["ConceptEncoder", "EncoderConfig", "encode_concept", "load_encoder", "save_encoder"]
