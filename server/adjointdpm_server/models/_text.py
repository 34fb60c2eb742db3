"""One tokenizer and its text encoder, frozen and shared by every request (docs/design.md §4.2).

Stable Diffusion has one (CLIP), SDXL two (CLIP-L, CLIP-G), SD3 three (CLIP-L, CLIP-G, T5), FLUX
two (CLIP-L, T5). Each pair is wrapped once here, so every family tokenizes, encodes and places a
textual-inversion token (paper Appendix A) the same way. Nothing runs under ``no_grad``: the
outputs are differentiable w.r.t. a substituted token embedding, and ``requires_grad_()`` on them
makes them leaves.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["TextEncoder", "broadcast"]


def broadcast(texts, batch: int, name: str) -> list[str]:
    """One string for all samples, or one per sample."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1; got {batch}")
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(s, str) for s in texts):
        raise ValueError(f"{name} must be a string or a list of strings")
    if len(texts) == 1:
        texts = texts * batch
    if len(texts) != batch:
        raise ValueError(f"got {len(texts)} {name}s for a batch of {batch}")
    return texts


class TextEncoder:
    """A tokenizer + encoder pair: token ids (padded to ``max_length``), placeholder slots for a
    learned token, and the encoder's forward with that token's input embedding substituted.

    Calls take turns under one lock: a fast (Rust) tokenizer keeps padding and truncation settings
    in shared state, and a substitution hook must see only its own call.
    """

    def __init__(self, tokenizer, encoder, max_length: int):
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.max_length = int(max_length)
        self._lock = threading.Lock()
        # The special tokens this tokenizer puts around a text (CLIP: BOS … EOS; T5: … EOS).
        bare = tokenizer("a", add_special_tokens=False).input_ids
        full = tokenizer("a").input_ids
        start = next(i for i in range(len(full)) if full[i:i + len(bare)] == bare)
        self._head, self._tail = full[:start], full[start + len(bare):]
        self._room = self.max_length - len(self._head) - len(self._tail)
        # Any id will do for a placeholder slot (its embedding is replaced), but not EOS, where
        # CLIP pools: BOS where the tokenizer has one (CLIP), else UNK (T5).
        self._slot_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.unk_token_id
        # The layers that look the ids up: T5 ties its input embeddings to a second module, which
        # is the one its encoder calls, so every embedding layer sharing the table gets the hook.
        weight = encoder.get_input_embeddings().weight
        self._lookups = [m for m in encoder.modules()
                         if isinstance(m, torch.nn.Embedding) and m.weight is weight]

    @property
    def width(self) -> int:
        """The width of the encoder's token input embeddings."""
        return self.encoder.get_input_embeddings().embedding_dim

    def table(self) -> torch.Tensor:
        """The token input embeddings (vocabulary × width), detached."""
        return self.encoder.get_input_embeddings().weight.detach()

    @property
    def device(self) -> torch.device:
        return self.table().device

    def tokenize(self, texts, **kwargs) -> list[list[int]]:
        with self._lock:
            return self.tokenizer(texts, verbose=False, **kwargs).input_ids

    def ids(self, texts: list[str]) -> torch.Tensor:
        """(B, max_length) ids, padded and truncated as diffusers' pipelines do."""
        ids = self.tokenize(texts, padding="max_length", max_length=self.max_length, truncation=True)
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def token_init(self, word: str) -> torch.Tensor:
        """The mean input embedding of ``word``'s tokens: a start for textual inversion."""
        ids = self.tokenize(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"{word!r} has no tokens")
        table = self.table()
        return table[torch.tensor(ids, device=table.device)].mean(0).clone()

    def _ids_with_placeholder(self, text: str, placeholder: str) -> tuple[list[int], list[int]]:
        """Ids of ``text`` with one slot per ``placeholder``, and the slots' positions. The text
        between placeholders is tokenized on its own, so the resident tokenizer needs no new token."""
        parts = text.split(placeholder)
        if len(parts) < 2:
            raise ValueError(f"the prompt {text!r} does not contain the placeholder {placeholder!r}")
        body, slots = [], []
        for k, part in enumerate(parts):
            if k:
                slots.append(len(body))
                body.append(self._slot_id)
            body += self.tokenize(part, add_special_tokens=False)
        if slots[-1] >= self._room:
            raise ValueError(f"the placeholder falls beyond the tokenizer's {self.max_length} "
                             f"tokens in {text!r}")
        ids = [*self._head, *body[:self._room], *self._tail]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return ids + [pad] * (self.max_length - len(ids)), [s + len(self._head) for s in slots]

    def ids_with_placeholder(self, texts: list[str], placeholder: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and a (B, L, 1) mask of the placeholder slots."""
        if not placeholder:
            raise ValueError("placeholder must be a non-empty string")
        rows = [self._ids_with_placeholder(text, placeholder) for text in texts]
        ids = torch.tensor([r[0] for r in rows], dtype=torch.long, device=self.device)
        mask = torch.zeros(ids.shape + (1,), dtype=torch.bool, device=self.device)
        for b, (_, slots) in enumerate(rows):
            mask[b, slots] = True
        return ids, mask

    def __call__(self, ids: torch.Tensor, substitute=None, **kwargs):
        """The encoder's output for ``ids``. ``substitute = (mask, embedding)`` replaces the input
        embeddings where ``mask`` is set, through a forward hook that lives only for this call and
        acts only in this thread."""
        with self._lock:
            handles = []
            if substitute is not None:
                mask, embedding = substitute
                owner = threading.get_ident()

                def hook(module, args, output):
                    if threading.get_ident() == owner and output.shape[:-1] == mask.shape[:-1]:
                        return torch.where(mask, embedding.to(output.dtype), output)
                    return output

                handles = [m.register_forward_hook(hook) for m in self._lookups]
            try:
                return self.encoder(input_ids=ids, **kwargs)
            finally:
                for handle in handles:
                    handle.remove()
