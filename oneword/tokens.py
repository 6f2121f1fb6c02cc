"""Placeholder tokens: new words S* whose embedding rows are the only trainable parameters.

Gal et al. (2023) learn one new row v* of the text encoder's embedding matrix while the
rest of the model stays frozen. We add the token to every tokenizer of the model and swap
each text encoder's `token_embedding` for `PlaceholderEmbedding`, which reads ids below the
original vocabulary from the untouched frozen matrix and ids above it from a small fp32
parameter. So only the new rows get gradients and optimizer state (not the 49k-row
matrix), and the original rows cannot drift: they are never written.

Multi-vector tokens follow diffusers: "<t>" with K vectors is "<t>", "<t>_1", ...,
"<t>_{K-1}", and prompts are expanded with `expand_prompt`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import TokenError


class _NewRows(nn.Module):
    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(rows)


class PlaceholderEmbedding(nn.Module):
    """A frozen `nn.Embedding` plus trainable fp32 rows for ids >= its vocabulary size.

    `vocab_size` is the tokenizer's length when the matrix has more rows than the tokenizer
    has entries (T5-XXL: 32,100 pieces, 32,128 rows): new tokens get ids from
    len(tokenizer) on, as in diffusers' `load_textual_inversion`, so the unused padding rows
    are never read.
    """

    def __init__(self, base: nn.Embedding, vocab_size: int | None = None):
        super().__init__()
        self.base = base
        self.base_vocab = min(vocab_size or base.num_embeddings, base.num_embeddings)
        # The new rows live in a child registered after `base`, so the text encoder's first
        # parameter (what `.dtype` reports and diffusers casts prompts to) stays a frozen one.
        self.new = _NewRows(torch.zeros(0, base.embedding_dim, device=base.weight.device))

    @property
    def rows(self) -> nn.Parameter:
        """The trainable fp32 rows (n_new, d), ids base_vocab, base_vocab + 1, ..."""
        return self.new.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def num_embeddings(self) -> int:
        return self.base_vocab + self.rows.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The full matrix (base rows, then the new ones), as a plain tensor."""
        base = self.base.weight[: self.base_vocab]
        return torch.cat([base, self.rows.detach().to(base.dtype)])

    def append(self, rows: torch.Tensor) -> list[int]:
        """Add rows (k, d); returns their ids."""
        start = self.num_embeddings
        new = torch.cat([self.rows.data, rows.detach().to(self.rows.device, torch.float32)])
        self.new.weight = nn.Parameter(new)
        return list(range(start, start + rows.shape[0]))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # (b, n) -> (b, n, d); new ids gather from `rows`, the rest from the frozen matrix.
        is_new = input_ids >= self.base_vocab
        embeds = self.base(input_ids.clamp(max=self.base_vocab - 1))
        if self.rows.shape[0] == 0 or not bool(is_new.any()):
            return embeds
        new_rows = self.rows[(input_ids - self.base_vocab).clamp(min=0)].to(embeds.dtype)
        return torch.where(is_new.unsqueeze(-1), new_rows, embeds)


@dataclass
class Placeholder:
    """A placeholder token added to a model.

    Attributes:
        token: the trigger word, e.g. "<my-cat>".
        names: its K sub-token strings ("<my-cat>", "<my-cat>_1", ...).
        ids: per text encoder, the K token ids.
        init_text: the initializer text.
        init_rows: per text encoder, the initial (K, d) fp32 rows (for an L2 pull toward them).
    """

    token: str
    names: list[str]
    ids: list[list[int]]
    init_text: str
    init_rows: list[torch.Tensor]

    @property
    def num_vectors(self) -> int:
        return len(self.names)


def placeholder_embedding(text_encoder, vocab_size: int | None = None) -> PlaceholderEmbedding:
    """The text encoder's `PlaceholderEmbedding`, installed on first use.

    Args:
        text_encoder: a transformers text model (CLIP or T5).
        vocab_size: the tokenizer's length, where it is below the number of rows (T5); used
            only when installing.
    """
    module = text_encoder.get_input_embeddings()
    if not isinstance(module, PlaceholderEmbedding):
        module = PlaceholderEmbedding(module, vocab_size)
        text_encoder.set_input_embeddings(module)
    return module


def sub_token_names(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def initial_rows(tokenizer, text_encoder, init_text: str, num_vectors: int) -> torch.Tensor:
    """(K, d) fp32 initial rows from `init_text` ("dog", "red star", ...).

    The text is tokenized without special tokens. With exactly K sub-tokens each vector
    starts from one of them; otherwise every vector starts from their mean (several words
    are averaged, never truncated to the first).
    """
    ids = tokenizer(init_text, add_special_tokens=False).input_ids
    if not ids:
        raise TokenError(
            f"initializer text {init_text!r} has no tokens; pass a word such as the concept's class ('dog')"
        )
    table = placeholder_embedding(text_encoder, len(tokenizer))
    if any(i >= table.num_embeddings for i in ids):
        raise TokenError(
            f"initializer text {init_text!r} uses a token this text encoder has no row for"
        )
    with torch.no_grad():
        rows = table(torch.tensor([ids], device=table.base.weight.device))[0].float()  # (n, d)
    if len(ids) == num_vectors:
        return rows.clone()
    return rows.mean(0, keepdim=True).repeat(num_vectors, 1)


def _vocabulary_lookup(tokenizer) -> Callable[[str], bool]:
    """Whether a string is in the tokenizer's vocabulary (added tokens included). A fast
    tokenizer asks its backend per string: building `get_vocab()`'s dict of CLIP's 49k
    entries took 30 ms, most of the encoder-alone path's time besides the forward pass."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda text: backend.token_to_id(text) is not None
    vocab = tokenizer.get_vocab()
    return vocab.__contains__


def add_placeholder(
    model,
    token: str,
    init_text: str,
    num_vectors: int = 1,
    *,
    init_rows: Sequence[torch.Tensor] | None = None,
    source: str | None = None,
) -> Placeholder:
    """Add `token` with K vectors to every tokenizer and text encoder of `model`.

    Args:
        model: a `LoadedModel` (or anything with `tokenizers` and `text_encoders` lists).
        token: the new word; must not exist yet and must tokenize to exactly its new ids.
        init_text: initializer word(s), e.g. the class word.
        num_vectors: K >= 1.
        init_rows: optional per-encoder (K, d) rows to start from instead (a warm start);
            refused when non-finite or absurdly long (`check_rows`).
        source: where `init_rows` came from (a file), for the messages.

    Returns:
        The `Placeholder`, with its ids per text encoder.
    """
    if num_vectors < 1:
        raise TokenError(f"--vectors must be >= 1, got {num_vectors}")
    if not token or re.search(r"\s", token):
        raise TokenError(
            f"placeholder token {token!r} must be one word without spaces, e.g. '<my-dog>'"
        )
    names = sub_token_names(token, num_vectors)
    if init_rows is not None and len(init_rows) != len(model.text_encoders):
        raise TokenError(
            f"warm start has rows for {len(init_rows)} text encoder(s) but the model has {len(model.text_encoders)}"
        )
    for tokenizer in model.tokenizers:
        known = _vocabulary_lookup(tokenizer)
        for name in names:
            # CLIP BPE spells a word "name</w>", SentencePiece "▁name".
            spellings = (name, name.lower(), f"{name.lower()}</w>", f"\u2581{name}")
            if any(known(spelling) for spelling in spellings):
                raise TokenError(
                    f"token {name!r} already exists in the tokenizer's vocabulary; "
                    "pick a new string such as '<my-concept>' (or load a different model)"
                )
    ids_per_encoder, rows_per_encoder = [], []
    for index, (tokenizer, text_encoder) in enumerate(zip(model.tokenizers, model.text_encoders)):
        table = placeholder_embedding(text_encoder, len(tokenizer))
        if table.rows.shape[0] == 0 and len(tokenizer) < table.base_vocab:
            # Installed before the tokenizer was known (e.g. by `trainable_rows`): new ids
            # start at len(tokenizer), below T5's padding rows, which are never read.
            table.base_vocab = len(tokenizer)
        if init_rows is not None:
            rows = init_rows[index].detach().float()
            if tuple(rows.shape) != (num_vectors, table.embedding_dim):
                raise TokenError(
                    f"warm-start rows for text encoder {index} have shape {tuple(rows.shape)}, "
                    f"expected ({num_vectors}, {table.embedding_dim})"
                )
            check_rows(
                rows,
                where=source or "the rows given",
                token=token,
                encoder=index,
                reference_norm=vocabulary_norm(text_encoder),
            )
        else:
            rows = initial_rows(tokenizer, text_encoder, init_text, num_vectors)
        added = tokenizer.add_tokens(names)
        ids = tokenizer.convert_tokens_to_ids(names)
        if added != num_vectors or ids != list(
            range(table.num_embeddings, table.num_embeddings + num_vectors)
        ):
            raise TokenError(
                f"token {token!r} could not be added as {num_vectors} new id(s) "
                f"(tokenizer {index} has {len(tokenizer)} entries, embedding {table.num_embeddings} rows)"
            )
        # An added token is matched before BPE or SentencePiece runs, so even a T5 token
        # that the vocabulary would split into pieces is one id.
        for name, expected in zip(names, ids):
            if tokenizer(name, add_special_tokens=False).input_ids != [expected]:
                raise TokenError(
                    f"token {name!r} does not tokenize to its own id; use a token without "
                    "characters the tokenizer splits off, e.g. '<my-concept>'"
                )
        table.append(rows)
        ids_per_encoder.append(ids)
        rows_per_encoder.append(rows.clone())
    return Placeholder(token, names, ids_per_encoder, init_text, rows_per_encoder)


# Rows longer than this many times the median norm of the model's own vocabulary rows are
# refused: CLIP's token rows have norms within a factor of ~3 of each other (SD 1.5: median
# 0.39, max 0.69), and a row 100x longer swamps every other word of the prompt (the images
# come out black or as noise), so such a row is a broken file or a diverged run.
NORM_LIMIT = 100.0


def vocabulary_norm(text_encoder) -> float:
    """The median L2 norm of the text encoder's original vocabulary rows (cached)."""
    table = placeholder_embedding(text_encoder)
    cached = getattr(table, "_median_norm", None)
    if cached is None:
        with torch.no_grad():
            cached = float(table.base.weight.detach().float().norm(dim=-1).median())
        table._median_norm = cached
    return cached


def check_rows(
    rows: torch.Tensor,
    *,
    where: str,
    token: str,
    encoder: int = 0,
    reference_norm: float | None = None,
    error: type[Exception] = TokenError,
    advice: str = "use another file or retrain the token",
) -> None:
    """Refuse rows a model cannot use: non-finite values, or (given the model's median
    vocabulary norm) a row longer than `NORM_LIMIT` times it.

    Args:
        rows: (K, d) rows of one token for one text encoder.
        where: the file or checkpoint they came from (named in the message).
        token: the token they belong to (named in the message).
        encoder: the text encoder's index (0-based; named 1-based for SDXL's two).
        reference_norm: `vocabulary_norm` of that text encoder; None skips the norm rule.
        error: the exception type to raise.
        advice: what the user should do, ending the message.
    """
    rows = rows.detach()
    finite = torch.isfinite(rows)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise error(
            f"{where}: the rows of {token!r} (text encoder {encoder + 1}) hold {bad} NaN/inf "
            f"value(s), so it is broken (a diverged run or a damaged copy); {advice}"
        )
    if reference_norm is not None and reference_norm > 0 and rows.numel():
        longest = float(rows.float().norm(dim=-1).max())
        if longest > NORM_LIMIT * reference_norm:
            raise error(
                f"{where}: a row of {token!r} (text encoder {encoder + 1}) has norm "
                f"{longest:.3g}, more than {NORM_LIMIT:g}x the median norm of this model's "
                f"vocabulary rows ({reference_norm:.3g}), so it would drown the rest of the "
                f"prompt (black or noise images); {advice}"
            )


def check_token_collisions(names: Sequence[str], texts: Sequence[str], *, what: str) -> None:
    """Refuse a token that would change how `texts` tokenize.

    Tokenizers split added tokens out of the text before anything else, even inside a word:
    with the token "phot", "a photo of a {}" becomes "a", "phot", "o", ... and the new word
    takes over "photo" in every prompt. So no sub-token name may occur inside the texts.

    Args:
        names: the token's sub-token names (`sub_token_names`).
        texts: the prompts or templates it will be used in ("{}" marks the token's slot).
        what: how to name the texts in the message ("template", "prompt").
    """
    for text in texts:
        fixed = text.replace("{}", " ").lower()
        for name in names:
            if name.lower() in fixed:
                word = next((w for w in fixed.split() if name.lower() in w), name)
                raise TokenError(
                    f"token {name!r} occurs inside the {what} word {word!r} ({text!r}); the "
                    f"tokenizer would cut {word!r} around it, so the token would take over "
                    "that word in every prompt: pick a token such as '<my-concept>'"
                )


def prompt_budget(tokenizer) -> int:
    """Token positions the text encoder reads for the prompt itself (77 - BOS - EOS = 75)."""
    return int(tokenizer.model_max_length) - 2


def vectors_that_fit(model, texts: Sequence[str]) -> tuple[int, str]:
    """How many vectors a token can have so that every text still fits the text encoder.

    Args:
        model: a `LoadedModel` (its tokenizers and their `model_max_length`).
        texts: templates with one "{}" for the token (the class-word cue already filled in).

    Returns:
        (the number of vectors that fit in the longest text, that text).
    """
    fit, longest = None, ""
    for tokenizer in model.tokenizers:
        for text in texts:
            used = len(tokenizer(text.replace("{}", " "), add_special_tokens=False).input_ids)
            room = prompt_budget(tokenizer) - used
            if fit is None or room < fit:
                fit, longest = room, text
    return max(fit or 0, 0), longest


def check_vectors_fit(model, vectors: int, texts: Sequence[str], *, what: str) -> None:
    """Refuse K vectors when a template with the token's K sub-tokens would be cut at the
    text encoder's limit (77 tokens with BOS and EOS): the rows past the cut would never be
    trained or used, and the end of the prompt would be dropped.

    Args:
        model: a `LoadedModel`.
        vectors: K.
        texts: the templates/prompts, with "{}" for the token.
        what: where the texts come from, for the message ("the object templates").
    """
    fit, longest = vectors_that_fit(model, texts)
    if vectors > fit:
        limit = min(int(t.model_max_length) for t in model.tokenizers)
        raise TokenError(
            f"--vectors {vectors} does not fit the prompt: {what} leave room for at most {fit} "
            f"vector(s) in the text encoder's {limit} tokens (longest: {longest!r}); the rest "
            f"would be cut off and never trained or used; pass --vectors {fit} or fewer"
        )


def check_prompt_fits(model, prompt: str, placeholders: Sequence[Placeholder]) -> None:
    """Refuse a prompt that the tokens' vectors push past the text encoder's limit (the end
    of the prompt would be cut off silently), saying how many vectors fit.

    Args:
        model: a `LoadedModel` with the placeholders added.
        prompt: the prompt as the user wrote it (tokens not expanded).
        placeholders: the tokens that may occur in it.
    """
    expanded = expand_prompt(prompt, placeholders)
    used_by_tokens = 0
    for p in placeholders:
        occurrences = len(re.findall(rf"(?<!\S){re.escape(p.token)}(?![_\w])", prompt))
        used_by_tokens += occurrences * p.num_vectors
    for tokenizer in model.tokenizers:
        used = len(tokenizer(expanded, add_special_tokens=False).input_ids)
        budget = prompt_budget(tokenizer)
        if used > budget:
            room = max(budget - (used - used_by_tokens), 0)
            raise TokenError(
                f"prompt {prompt!r} needs {used} tokens ({used_by_tokens} for the learned "
                f"tokens' vectors) but the text encoder reads {budget}; the end of the prompt "
                f"would be cut off: shorten it, or use tokens with at most {room} vector(s) "
                "in all in this prompt"
            )


def trainable_rows(model) -> list[nn.Parameter]:
    """The new-row parameters of each text encoder (the only things an optimizer needs)."""
    return [placeholder_embedding(te).rows for te in model.text_encoders]


def get_rows(model, placeholder: Placeholder) -> list[torch.Tensor]:
    """Per text encoder, the placeholder's current (K, d) fp32 rows (detached copies)."""
    out = []
    for text_encoder, ids in zip(model.text_encoders, placeholder.ids):
        table = placeholder_embedding(text_encoder)
        out.append(table.rows.detach()[[i - table.base_vocab for i in ids]].clone())
    return out


def set_rows(model, placeholder: Placeholder, rows: Sequence[torch.Tensor]) -> None:
    """Overwrite the placeholder's rows (per text encoder, (K, d))."""
    for text_encoder, ids, value in zip(model.text_encoders, placeholder.ids, rows):
        table = placeholder_embedding(text_encoder)
        with torch.no_grad():
            table.rows[[i - table.base_vocab for i in ids]] = value.to(table.rows)


def expand_prompt(prompt: str, placeholders: Sequence[Placeholder]) -> str:
    """Replace each multi-vector token by its K sub-tokens ("<t>" -> "<t> <t>_1 <t>_2")."""
    for p in sorted(placeholders, key=lambda p: -len(p.token)):
        if p.num_vectors > 1:
            prompt = re.sub(rf"(?<!\S){re.escape(p.token)}(?![_\w])", " ".join(p.names), prompt)
    return prompt
