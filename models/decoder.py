"""TransformerDecoder / BiTransformerDecoder (WeNet decoder.py, decoder_layer.py; pre-LN, ReLU FFN)."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import MultiHeadedAttention, PositionalEncoding, PositionwiseFeedForward, make_pad_mask, subsequent_mask


class DecoderLayer(nn.Module):
    def __init__(self, size: int, heads: int, units: int, dropout_rate: float, attn_dropout: float):
        super().__init__()
        self.self_attn = MultiHeadedAttention(heads, size, attn_dropout)
        self.src_attn = MultiHeadedAttention(heads, size, attn_dropout)
        self.feed_forward = PositionwiseFeedForward(size, units, dropout_rate, nn.ReLU())
        self.norm1 = nn.LayerNorm(size, eps=1e-5)
        self.norm2 = nn.LayerNorm(size, eps=1e-5)
        self.norm3 = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, tgt, tgt_mask, memory, memory_mask):
        residual = tgt
        tgt = self.norm1(tgt)
        x = residual + self.dropout(self.self_attn(tgt, tgt, tgt, tgt_mask))
        residual = x
        x = self.norm2(x)
        x = residual + self.dropout(self.src_attn(x, memory, memory, memory_mask))
        residual = x
        x = self.norm3(x)
        return residual + self.dropout(self.feed_forward(x))


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig, num_blocks: int):
        super().__init__()
        d = cfg.output_size
        self.embed = nn.Sequential(nn.Embedding(cfg.vocab_size, d), PositionalEncoding(d, cfg.positional_dropout_rate))
        self.decoders = nn.ModuleList([
            DecoderLayer(d, cfg.decoder_attention_heads, cfg.decoder_linear_units, cfg.dropout_rate,
                         cfg.attention_dropout_rate)
            for _ in range(num_blocks)
        ])
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.output_layer = nn.Linear(d, cfg.vocab_size)

    def forward(self, memory, memory_mask, ys_in_pad, ys_in_lens):
        maxlen = ys_in_pad.size(1)
        tgt_mask = (~make_pad_mask(ys_in_lens, maxlen)).unsqueeze(1)
        tgt_mask = tgt_mask & subsequent_mask(maxlen, tgt_mask.device).unsqueeze(0)
        x = self.embed[0](ys_in_pad)
        x, _ = self.embed[1](x)
        for layer in self.decoders:
            x = layer(x, tgt_mask, memory, memory_mask)
        return self.output_layer(self.after_norm(x))


class BiTransformerDecoder(nn.Module):
    """Left-to-right and right-to-left decoders; the right one runs only when reverse_weight > 0."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.left_decoder = TransformerDecoder(cfg, cfg.decoder_num_blocks)
        self.right_decoder = TransformerDecoder(cfg, cfg.r_decoder_num_blocks)

    def forward(self, memory, memory_mask, ys_in_pad, ys_in_lens, r_ys_in_pad, reverse_weight: float = 0.0):
        l_x = self.left_decoder(memory, memory_mask, ys_in_pad, ys_in_lens)
        r_x = torch.zeros_like(l_x)
        if reverse_weight > 0.0:
            r_x = self.right_decoder(memory, memory_mask, r_ys_in_pad, ys_in_lens)
        return l_x, r_x
