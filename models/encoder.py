"""ConformerEncoder (WeNet BaseEncoder.forward, full attention: the offline export path)."""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import (Conv2dSubsampling4, ConvolutionModule, GlobalCMVN, PositionwiseFeedForward,
                     RelPositionalEncoding, RelPositionMultiHeadedAttention, make_pad_mask)


class ConformerEncoderLayer(nn.Module):
    """Macaron FFN x0.5 -> rel-pos MHSA -> conv module -> FFN x0.5 -> final LayerNorm (all pre-LN, eps 1e-5)."""

    def __init__(self, size: int, cfg: ModelConfig):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(cfg.attention_heads, size, cfg.attention_dropout_rate)
        self.feed_forward = PositionwiseFeedForward(size, cfg.linear_units, cfg.dropout_rate, nn.SiLU())
        self.feed_forward_macaron = PositionwiseFeedForward(size, cfg.linear_units, cfg.dropout_rate, nn.SiLU())
        self.conv_module = ConvolutionModule(size, cfg.cnn_module_kernel, cfg.cnn_module_norm, cfg.causal)
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-5)
        self.norm_conv = nn.LayerNorm(size, eps=1e-5)
        self.norm_final = nn.LayerNorm(size, eps=1e-5)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.ff_scale = 0.5

    def forward(self, x, mask, pos_emb, mask_pad):
        residual = x
        x = self.norm_ff_macaron(x)
        x = residual + self.ff_scale * self.dropout(self.feed_forward_macaron(x))

        residual = x
        x = self.norm_mha(x)
        x = residual + self.dropout(self.self_attn(x, x, x, mask, pos_emb))

        residual = x
        x = self.norm_conv(x)
        x = residual + self.dropout(self.conv_module(x, mask_pad))

        residual = x
        x = self.norm_ff(x)
        x = residual + self.ff_scale * self.dropout(self.feed_forward(x))
        return self.norm_final(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.output_size
        self._output_size = d
        # Identity statistics until real ones are set from the training data (set_cmvn).
        self.global_cmvn = GlobalCMVN(torch.zeros(cfg.input_dim), torch.ones(cfg.input_dim))
        self.embed = Conv2dSubsampling4(cfg.input_dim, d, RelPositionalEncoding(d, cfg.positional_dropout_rate))
        self.encoders = nn.ModuleList([ConformerEncoderLayer(d, cfg) for _ in range(cfg.num_blocks)])
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def output_size(self) -> int:
        return self._output_size

    def set_cmvn(self, stats: dict) -> None:
        mean, istd = GlobalCMVN.from_stats(stats)
        self.global_cmvn.mean.copy_(mean)
        self.global_cmvn.istd.copy_(istd)

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor):
        """xs: (B, T, 80) raw log-fbank; returns (B, T', d) and the (B, 1, T') valid-frame mask."""
        masks = ~make_pad_mask(xs_lens, xs.size(1)).unsqueeze(1)
        xs = self.global_cmvn(xs)
        xs, pos_emb, masks = self.embed(xs, masks)
        mask_pad = masks
        for layer in self.encoders:
            xs = layer(xs, masks, pos_emb, mask_pad)
        return self.after_norm(xs), masks
