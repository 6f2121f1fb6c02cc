"""How learnable a target table is from the image tower's features, in seconds, before any
encoder is trained or evaluated.

The training identities of a target table (`make_targets.py`) are split into a fitting part
and a held-out part (by identity, so held-out identities are new combinations, as validation
and test concepts are). On the held-out targets it reports the regression loss of the
encoder's objective, mean ||v - v*||^2 / ||c||^2, for:

- the class word (the untrained encoder), and the identity's other image-set target (what a
  second classic run gives; its loss is twice the spread of one target about its identity);
- ridge regression from the mean pooled tower features of the target's images to the
  offset v* - c (a linear stand-in for the encoder's head, which reads the same on the
  world), over a few penalties, and its learning curve over fractions of the fitting part;
- an oracle: ridge from the true shape, colour and pattern (one-hot, additive) to the
  offset, so "how far are the targets from a sum of per-value parts" is measured apart from
  "how well does the tower see the values";

and the retrieval rate: the share of held-out targets whose prediction lies closest to their
own identity's mean target among all held-out identities' means.

With `--against` (eval runs that kept classic inversion's snapshots, `oneword eval --methods
classic:...`) it also measures, on those runs' concepts (validation, never fitted), the same
loss against classic's token at `--reference-steps` for the class word, classic's own earlier
snapshots, ridge fitted on every target of the table, and each `--encoder NAME=PATH`: how
close each start lies to where classic goes, to set beside the identity `oneword eval` reads.
`--space unet` measures it through the UNet instead (`oneword.encoder.losses`: its prediction
with v against with classic's token, on the concept's own images, the same `--draws` for
every start; 1 = the class word).

    python benchmarks/target_learnability.py --model checkpoints/world --targets runs/targets
    python benchmarks/target_learnability.py --targets runs/targets \
        --against runs/eval-validation-classic --suite runs/suite-validation \
        --encoder shipped=checkpoints/world-encoder.safetensors

Prints one JSON object. Tower features are computed once per target (5 images each).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))


def ridge(x_fit: torch.Tensor, y_fit: torch.Tensor, x: torch.Tensor, penalty: float):
    """Ridge regression on standardised inputs with an unpenalised-in-effect bias column:
    fit (n, f) -> (n, d), predict (m, f) -> (m, d)."""
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    ones = torch.ones(len(x_fit), 1)
    a = torch.cat([(x_fit - mean) / std, ones], 1)
    b = torch.cat([(x - mean) / std, torch.ones(len(x), 1)], 1)
    w = torch.linalg.solve(a.T @ a + penalty * torch.eye(a.shape[1]), a.T @ y_fit)
    return b @ w


def one_hot(names: list[str]) -> torch.Tensor:
    """World identity names -> (n, values) additive one-hot codes of shape, colour, pattern."""
    from oneword.encoder.targets import identity_from_name

    parts = [(i.shape, i.colour, i.pattern) for i in map(identity_from_name, names)]
    values = [sorted({p[j] for p in parts}) for j in range(3)]
    return torch.tensor([[float(p[j] == v) for j in range(3) for v in values[j]] for p in parts])


PAIRED_STEPS = 10


def unet_metric(model, images, target: torch.Tensor, c: torch.Tensor, draws: int, name: str):
    """v (d,) -> the UNet-space regression loss of v against `target` (1 at the class word c)
    on the concept's images: the same `draws` (image, template, t, noise) for every v, and
    the target's and class word's predictions computed once for all of them."""
    from oneword.encoder.losses import unet_predictor
    from oneword.images import images_to_tensor
    from oneword.inversion.objective import scale_latents
    from oneword.inversion.templates import load_templates
    from oneword.tokens import add_placeholder

    slot = f"<oneword-against-{len(model.tokenizers[0])}>"
    slot = add_placeholder(model, slot, "object", 1, init_rows=[torch.zeros(1, len(c))])
    with torch.no_grad():
        pixels = images_to_tensor(images).to(model.device, model.dtype)
        latents = scale_latents(model, model.vae.encode(pixels).latent_dist.mean.float())
    pick = torch.arange(draws) % len(latents)
    generator = torch.Generator().manual_seed(int.from_bytes(name.encode()[:6], "little"))
    prediction = unet_predictor(model, [slot], latents[pick], load_templates("object"), generator)

    def predict(v: torch.Tensor) -> torch.Tensor:
        return prediction([v[None, None]])  # one concept, K = 1

    with torch.no_grad():
        reference = predict(target)
        scale = (predict(c) - reference).pow(2).sum().clamp_min(1e-12)

    def loss(v: torch.Tensor) -> float:
        with torch.no_grad():
            return float((predict(v) - reference).pow(2).sum() / scale)

    return loss


def against_classic(args, model, tower, pooled, offsets, fit_penalty: float) -> dict:
    """Loss against classic's `--reference-steps` token on the concepts of `--against`'s eval
    runs, per start: mean and standard error over concepts."""
    from oneword.datasets.suite import read_suite
    from oneword.encoder.model import class_word_rows, encode_concept, load_encoder
    from oneword.evaluation.harness import read_classic_run
    from oneword.images import images_to_tensor, load_images

    encoders = {}
    for item in args.encoder:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--encoder {item!r}: expected NAME=PATH")
        encoders[name] = load_encoder(path)
    reference, starts = str(args.reference_steps), {}
    for concept in read_suite(args.suite):
        runs = (read_classic_run(Path(run) / "progress", concept.name) for run in args.against)
        kept = next((k for k in runs if k is not None), None)
        if kept is None or args.reference_steps not in kept["snapshots"]:
            continue
        # the first text encoder's first vector at each kept step
        snapshots = {n: rows[0][0].float() for n, (rows, _) in kept["snapshots"].items()}
        target = snapshots[int(reference)]
        c = class_word_rows(model, concept.class_word, 1)[0][0].float()
        images = load_images(concept.images, model.resolution)
        with torch.no_grad():
            features = tower(images_to_tensor(images)).pooled.float().mean(0)
        start = {
            "class word": c,
            "ridge": c + ridge(pooled, offsets, features[None], fit_penalty)[0],
        }
        start |= {f"classic:{n}": v for n, v in snapshots.items() if n < args.reference_steps}
        for name, encoder in encoders.items():
            token = encode_concept(encoder, model, images, "<x>", concept.class_word, tower=tower)
            start[f"encoder {name}"] = token.vectors[0][0].float()
        if args.space == "unet":
            unet_loss = unet_metric(model, images, target, c, args.draws, concept.name)
        for name, v in start.items():
            if args.space == "unet":
                loss = unet_loss(v)
            else:
                loss = float((v - target).pow(2).sum() / c.pow(2).sum())
            starts.setdefault(name, []).append(loss)
    if not starts:
        raise SystemExit(
            f"--against: no kept classic run with a {reference}-step snapshot for a concept of "
            f"{args.suite}"
        )
    out = {
        "reference": f"classic:{reference}",
        "space": args.space,
        "concepts": len(starts["class word"]),
    }
    # Paired over concepts against classic's 10-step snapshot (the equal-quality question:
    # is a start closer than 10 steps of classic?); the spread between concepts is large.
    base = torch.tensor(starts.get(f"classic:{PAIRED_STEPS}", starts["class word"]))
    for name, losses in starts.items():
        x = torch.tensor(losses)
        out[name] = {
            "loss": round(float(x.mean()), 4),
            "stderr": round(float(x.std() / len(x) ** 0.5), 4),
            "minus_classic_10": round(float((x - base).mean()), 4),
            "minus_classic_10_stderr": round(float((x - base).std() / len(x) ** 0.5), 4),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/world", help="the targets' world model")
    parser.add_argument("--targets", required=True, help="make_targets.py --out folder or table")
    parser.add_argument("--held-out", type=float, default=0.2, help="share of identities held out")
    parser.add_argument("--seed", type=int, default=0, help="seeds the identity split")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--against", nargs="*", default=[], help="eval run folders with kept classic runs"
    )
    parser.add_argument("--suite", help="the suite those eval runs scored (with --against)")
    parser.add_argument(
        "--space",
        choices=("rows", "unet"),
        default="rows",
        help="--against's metric: rows (||v - v*||^2 / ||c||^2) or unet (the UNet's prediction)",
    )
    parser.add_argument(
        "--draws", type=int, default=32, help="--space unet: (image, t, noise) draws per concept"
    )
    parser.add_argument(
        "--reference-steps", type=int, default=100, help="classic's snapshot to measure against"
    )
    parser.add_argument(
        "--encoder", action="append", default=[], metavar="NAME=PATH", help="an encoder to place"
    )
    args = parser.parse_args(argv)
    if args.against and not args.suite:
        parser.error("--against needs --suite (the suite the eval runs scored)")
    torch.set_num_threads(args.threads)

    from oneword.clip import load_tower
    from oneword.encoder.features import Featurizer
    from oneword.encoder.model import class_word_rows
    from oneword.encoder.targets import TargetRegression, load_targets
    from oneword.models import load_model

    model = load_model(args.model)
    tower = load_tower("world", model_folder=model.extra.get("folder"), device=model.device)
    table = load_targets(args.targets)
    regression = TargetRegression(table, Featurizer(tower, model), model.resolution, "cpu")
    pooled = torch.stack([regression.features(i)[0].mean(0) for i in range(len(table))])
    rows = table.rows[0][:, 0].float()  # (N, d): the first text encoder's first vector
    class_rows = {w: class_word_rows(model, w, 1)[0][0].float() for w in set(table.class_words)}
    c = torch.stack([class_rows[w] for w in table.class_words])  # (N, d)

    identities = sorted(set(table.names))
    random.Random(args.seed).shuffle(identities)
    held = set(identities[: round(args.held_out * len(identities))])
    fit = [i for i, n in enumerate(table.names) if n not in held]
    test = [i for i, n in enumerate(table.names) if n in held]
    scale = c[test].pow(2).sum(-1)

    def loss(predicted: torch.Tensor) -> float:
        return float(((predicted - rows[test]).pow(2).sum(-1) / scale).mean())

    held_names = sorted(held)
    centres = torch.stack(
        [rows[[i for i in test if table.names[i] == n]].mean(0) for n in held_names]
    )
    own = torch.tensor([held_names.index(table.names[i]) for i in test])

    def retrieval(predicted: torch.Tensor) -> float:
        return float((torch.cdist(predicted, centres).argmin(-1) == own).float().mean())

    def scored(predicted: torch.Tensor) -> dict:
        return {"loss": round(loss(predicted), 4), "retrieval": round(retrieval(predicted), 4)}

    other = rows[test].clone()  # the identity's other image-set target
    for n in held_names:
        pair = [i for i, j in enumerate(test) if table.names[j] == n]
        if len(pair) == 2:
            other[pair[0]], other[pair[1]] = rows[test][pair[1]], rows[test][pair[0]]
    offsets = rows - c
    codes = one_hot(table.names)  # the true attributes, for the additive oracle
    report: dict = {
        "targets": str(args.targets),
        "settings": table.settings,
        "fit": {"targets": len(fit), "identities": len(identities) - len(held)},
        "held_out": {"targets": len(test), "identities": len(held)},
        # median ||v* - c|| / ||c||, c the identity's own class word
        "offset_length": round(float(((rows - c).norm(dim=-1) / c.norm(dim=-1)).median()), 3),
        "class_word": scored(c[test]),
        "other_image_set": scored(other),
        "ridge_pooled": {
            str(p): scored(c[test] + ridge(pooled[fit], offsets[fit], pooled[test], p))
            for p in (1, 10, 100, 1000)
        },
        "oracle_additive": {
            str(p): scored(c[test] + ridge(codes[fit], offsets[fit], codes[test], p))
            for p in (0.1, 1, 10)
        },
    }
    fit_names = sorted({table.names[i] for i in fit})
    curve = {}
    for share in (0.25, 0.5, 0.75, 1.0):
        losses = []
        for draw in range(5 if share < 1 else 1):
            keep = set(random.Random(draw).sample(fit_names, round(share * len(fit_names))))
            part = [i for i in fit if table.names[i] in keep]
            losses.append(
                min(
                    loss(c[test] + ridge(pooled[part], offsets[part], pooled[test], p))
                    for p in (1, 10, 100)
                )
            )
        curve[str(round(share * len(fit_names)))] = round(sum(losses) / len(losses), 4)
    report["ridge_learning_curve"] = curve  # fitting identities -> best held-out loss
    if args.against:
        report["against_classic"] = against_classic(
            args, model, tower, pooled, offsets, fit_penalty=10
        )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
