"""The miniature world's models: training (`train`), the ground-truth oracle (`oracle`) and
the prompt-fidelity measurement (`fidelity`). The world's images live in `oneword.datasets.world`."""
