"""Building blocks of WeNet's transformer/conformer, kept line-for-line close to wenet/models/transformer/*.py
so that the exported graph has the same operators (and the same quantization problems) as a real WeNet export."""
from __future__ import annotations

import math

import torch
from torch import nn


def make_pad_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """True at padded positions: (B, max_len). As wenet/utils/mask.py."""
    batch_size = lengths.size(0)
    seq_range = torch.arange(0, max_len, dtype=torch.int64, device=lengths.device)
    seq_range_expand = seq_range.unsqueeze(0).expand(batch_size, max_len)
    seq_length_expand = lengths.unsqueeze(-1)
    return seq_range_expand >= seq_length_expand


def subsequent_mask(size: int, device: torch.device) -> torch.Tensor:
    arange = torch.arange(size, device=device)
    mask = arange.expand(size, size)
    return mask <= arange.unsqueeze(-1)


class GlobalCMVN(nn.Module):
    """(x - mean) * istd with buffers: the first node of the exported encoder (the input is raw log-fbank)."""

    def __init__(self, mean: torch.Tensor, istd: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("istd", istd.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) * self.istd

    @staticmethod
    def from_stats(stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """WeNet's global_cmvn JSON {mean_stat, var_stat, frame_num} -> (mean, istd), variance floored at 1e-20."""
        n = float(stats["frame_num"])
        mean = torch.tensor(stats["mean_stat"], dtype=torch.float64) / n
        var = torch.tensor(stats["var_stat"], dtype=torch.float64) / n - mean * mean
        istd = 1.0 / torch.sqrt(torch.clamp(var, min=1e-20))
        return mean.float(), istd.float()


class PositionalEncoding(nn.Module):
    """Absolute sinusoid: x*sqrt(d) + pe (decoder)."""

    def __init__(self, d_model: int, dropout_rate: float, max_len: int = 5000):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(p=dropout_rate)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float32).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)

    def position_encoding(self, size: int) -> torch.Tensor:
        return self.pe[:, :size]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos_emb = self.position_encoding(x.size(1))
        x = x * self.xscale + pos_emb
        return self.dropout(x), self.dropout(pos_emb)


class RelPositionalEncoding(PositionalEncoding):
    """WeNet's rel_pos: x*sqrt(d) and the plain 1xTxd sinusoid returned separately (not the 2T-1 table)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x * self.xscale
        pos_emb = self.position_encoding(x.size(1))
        return self.dropout(x), self.dropout(pos_emb)


class Conv2dSubsampling4(nn.Module):
    """Two 3x3 stride-2 convs with ReLU, then Linear(d*19, d): T' = ((T-1)//2-1)//2."""

    def __init__(self, idim: int, odim: int, pos_enc: nn.Module):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, odim, 3, 2), nn.ReLU(), nn.Conv2d(odim, odim, 3, 2), nn.ReLU())
        self.out = nn.Linear(odim * (((idim - 1) // 2 - 1) // 2), odim)
        self.pos_enc = pos_enc
        self.subsampling_rate = 4
        self.right_context = 6

    def forward(self, x: torch.Tensor, x_mask: torch.Tensor):
        x = x.unsqueeze(1)
        x = self.conv(x)
        b, c, t, f = x.size()
        x = self.out(x.transpose(1, 2).contiguous().view(b, t, c * f))
        x, pos_emb = self.pos_enc(x)
        return x, pos_emb, x_mask[:, :, 2::2][:, :, 2::2]


class MultiHeadedAttention(nn.Module):
    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__()
        assert n_feat % n_head == 0
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(p=dropout_rate)

    def forward_qkv(self, query, key, value):
        n_batch = query.size(0)
        q = self.linear_q(query).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        k = self.linear_k(key).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(value).view(n_batch, -1, self.h, self.d_k).transpose(1, 2)
        return q, k, v

    def forward_attention(self, value, scores, mask):
        n_batch = value.size(0)
        if mask.size(2) > 0:
            mask = mask.unsqueeze(1).eq(0)
            mask = mask[:, :, :, : scores.size(-1)]
            scores = scores.masked_fill(mask, -float("inf"))
            attn = torch.softmax(scores.float(), dim=-1).type_as(value).masked_fill(mask, 0.0)
        else:
            attn = torch.softmax(scores.float(), dim=-1).type_as(value)
        p_attn = self.dropout(attn)
        x = torch.matmul(p_attn, value)
        x = x.transpose(1, 2).contiguous().view(n_batch, -1, self.h * self.d_k)
        return self.linear_out(x)

    def forward(self, query, key, value, mask, pos_emb=None):
        q, k, v = self.forward_qkv(query, key, value)
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL style biases u/v; rel_shift deliberately not applied, as in WeNet."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__(n_head, n_feat, dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.Tensor(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.Tensor(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, query, key, value, mask, pos_emb=None):
        q, k, v = self.forward_qkv(query, key, value)
        q = q.transpose(1, 2)
        n_batch_pos = pos_emb.size(0)
        p = self.linear_pos(pos_emb).view(n_batch_pos, -1, self.h, self.d_k).transpose(1, 2)
        q_with_bias_u = (q + self.pos_bias_u).transpose(1, 2)
        q_with_bias_v = (q + self.pos_bias_v).transpose(1, 2)
        matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))
        matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        return self.forward_attention(v, scores, mask)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, dropout_rate: float, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x):
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConvolutionModule(nn.Module):
    """Pointwise conv + GLU, depthwise conv (K), BatchNorm or LayerNorm, SiLU, pointwise conv; padding zeroed.
    As wenet/models/transformer/convolution.py: causal pads K-1 zero frames on the left of the module's input
    (before pointwise_conv1, so the padded frames reach the depthwise conv as GLU(bias), not zeros)."""

    def __init__(self, channels: int, kernel_size: int, norm: str = "batch_norm", causal: bool = False):
        super().__init__()
        if causal:
            padding, self.lorder = 0, kernel_size - 1
        else:
            assert (kernel_size - 1) % 2 == 0
            padding, self.lorder = (kernel_size - 1) // 2, 0
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1)
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding, groups=channels)
        self.use_layer_norm = norm == "layer_norm"
        # LayerNorm normalises the channel dim, so WeNet transposes to (B, T, C) around it.
        self.norm = nn.LayerNorm(channels, eps=1e-5) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1)
        self.activation = nn.SiLU()

    def forward(self, x, mask_pad):
        x = x.transpose(1, 2)
        if mask_pad.size(2) > 0:
            x = x.masked_fill(~mask_pad, 0.0)
        if self.lorder > 0:  # exports as an ONNX Pad
            x = nn.functional.pad(x, (self.lorder, 0), "constant", 0.0)
        x = self.pointwise_conv1(x)
        x = nn.functional.glu(x, dim=1)
        x = self.depthwise_conv(x)
        if self.use_layer_norm:
            x = x.transpose(1, 2)
        x = self.activation(self.norm(x))
        if self.use_layer_norm:
            x = x.transpose(1, 2)
        x = self.pointwise_conv2(x)
        if mask_pad.size(2) > 0:
            x = x.masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2)
