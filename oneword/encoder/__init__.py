"""The concept encoder: a few images -> a new word's embedding rows in one forward pass.

- `oneword.encoder.model`: the encoder head, its file format and `encode_concept`.
- `oneword.encoder.encode`: the card's path, `oneword encode`: predict, refine with
  inversion, check, fall back to full inversion.
- `oneword.encoder.features`: tower features and VAE latents for training, cached on disk
  (the frozen CLIP towers come from `oneword.clip`).
- `oneword.encoder.data`: concept sets for pretraining (the world, shards, image folders).

Pretraining is the root script `train_encoder.py`. Nothing heavy is imported here.
"""

from .model import ConceptEncoder, EncoderConfig, encode_concept, load_encoder, save_encoder

__all__ = ["ConceptEncoder", "EncoderConfig", "encode_concept", "load_encoder", "save_encoder"]
