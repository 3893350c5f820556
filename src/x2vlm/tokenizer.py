"""BERT WordPiece tokenizer (uncased) through the ``tokenizers`` library.

The bert-base-uncased vocabulary ships with the package (``assets/bert-base-uncased-vocab.txt``,
30,522 entries, md5 64800d5d8528ce344256daf115d4965e), so nothing is downloaded. Texts become
``[CLS] wordpieces [SEP]`` rows padded with ``[PAD]`` (id 0), as the official code feeds BERT.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

ASSETS = Path(__file__).parent / "assets"
VOCAB_FILE_NAME = "vocab.txt"
BUNDLED_VOCABS = {"bert-base-uncased": ASSETS / "bert-base-uncased-vocab.txt"}
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer:
    def __init__(self, vocab_file: str | Path, lowercase: bool = True):
        self.vocab_file = Path(vocab_file)
        if not self.vocab_file.exists():
            raise FileNotFoundError(f"vocabulary file not found: {self.vocab_file}")
        tokens = self.vocab_file.read_text(encoding="utf-8").splitlines()
        self.vocab = {tok: i for i, tok in enumerate(tokens)}
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"{self.vocab_file}: special tokens {missing} are not in the vocabulary")
        tok = _HFTokenizer(models.WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self.pad_token_id = self.vocab["[PAD]"]
        self.unk_token_id = self.vocab["[UNK]"]
        self.cls_token_id = self.vocab["[CLS]"]
        self.sep_token_id = self.vocab["[SEP]"]
        self.mask_token_id = self.vocab["[MASK]"]
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", self.cls_token_id), ("[SEP]", self.sep_token_id)]
        )
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        self._tok = tok
        self.id_to_token = tokens

    @classmethod
    def from_name_or_path(cls, name_or_path: str | Path) -> "WordPieceTokenizer":
        """A bundled vocabulary by name, a vocab file, or a directory holding ``vocab.txt``."""
        if str(name_or_path) in BUNDLED_VOCABS:
            return cls(BUNDLED_VOCABS[str(name_or_path)])
        path = Path(name_or_path)
        if path.is_dir():
            path = path / VOCAB_FILE_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"tokenizer {str(name_or_path)!r}: not a bundled vocabulary ({sorted(BUNDLED_VOCABS)}) and no file at {path}"
            )
        return cls(path)

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def special_ids(self) -> set[int]:
        """Ids never used as random MLM replacements: the special tokens and every [unusedN]."""
        from x2vlm.data.masking import special_ids_from_vocab

        return set(special_ids_from_vocab(self.vocab))

    def tokenize(self, text: str) -> list[str]:
        """Wordpieces without [CLS]/[SEP]."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode_one(self, text: str, max_length: int | None = None) -> list[int]:
        """``[CLS] ... [SEP]`` ids, truncated to ``max_length`` (keeping the final [SEP])."""
        ids = self._tok.encode(text).ids
        if max_length is not None and len(ids) > max_length:
            ids = ids[: max_length - 1] + [self.sep_token_id]
        return ids

    def __call__(
        self, texts: str | list[str], max_length: int | None = None, pad_to: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of texts -> (ids, attention mask), padded to the longest row or to ``pad_to``."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode_one(t, max_length) for t in texts]
        width = max(pad_to or 0, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return ids, mask

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | Path) -> Path:
        target = Path(directory) / VOCAB_FILE_NAME
        target.write_text("\n".join(self.id_to_token) + "\n", encoding="utf-8")
        return target
