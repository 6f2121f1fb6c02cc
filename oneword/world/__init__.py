"""The miniature world's readers: the ground-truth oracle (`oracle`) and the prompt-fidelity
measurement (`fidelity`). The world's images live in `oneword.datasets.world`; training its
models is the root script `train_world.py` (`oneword world train` runs it)."""
