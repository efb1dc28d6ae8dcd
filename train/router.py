"""router.py — the MoQAE router of docs/ROUTER-FORMAT.md (version 1) in PyTorch: the module that
train/train_router.py trains, the vote rule that turns it into per-chunk decisions (the computation the
runtime's router.c/kv-ring.c must reproduce), and the loader of router GGUF files with their checks
against the model. The writer is train/export_router.py.

Per token t of a chunk (x_t: layer 0's input, the token embedding, f32):
    x̂_t = x_t / sqrt(mean(x_t²) + norm_eps);  logit_t = W3 (silu(W1 x̂_t) ⊙ (W2 x̂_t))
    vote_t = argmax_j logit_t[j] (ties: lower j); the chunk's expert = most votes (ties: lower j);
    chunk 0 -> FP16 when freeze_first_chunk.
Router g decides for layers g·group_size .. min((g+1)·group_size, n_layer) − 1.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from reference import CODEC_INDEX, CODECS

FORMAT_VERSION = 1
ARCH = "moqae-router"
BITS = {"fp16": 16, "int8": 8, "int4": 4, "int2": 2}
CODEC_OF_BITS = {b: c for c, b in BITS.items()}


@dataclasses.dataclass
class RouterConfig:
    n_embd: int
    n_layer: int
    experts: tuple = ("fp16", "int4", "int2")  # highest precision first
    chunk: int = 32
    hidden: int = 32
    share: str = "all"  # all | group | none
    group_size: int = 0  # layers per decision (set from share: n_layer, G, 1)
    freeze: bool = True
    norm_eps: float = 1e-5
    input_layer: int = 0

    def __post_init__(self):
        self.experts = tuple(self.experts)
        if self.share == "all":
            self.group_size = self.n_layer
        elif self.share == "none":
            self.group_size = 1
        elif self.share != "group" or not 1 <= self.group_size <= self.n_layer:
            raise ValueError(f"share {self.share!r} with group_size {self.group_size}: use all, none, or group with "
                             f"1 <= group_size <= n_layer ({self.n_layer})")
        check_experts(self.experts)
        if self.chunk not in (32, 64):
            raise ValueError(f"chunk size must be 32 or 64, not {self.chunk}")

    @property
    def n_router(self) -> int:
        return -(-self.n_layer // self.group_size)

    @property
    def bits(self) -> list:
        return [BITS[c] for c in self.experts]


def check_experts(experts) -> None:
    if not 2 <= len(experts) <= 4 or len(set(experts)) != len(experts) or any(c not in BITS for c in experts):
        raise ValueError(f"experts {list(experts)}: 2 to 4 distinct codecs from {list(BITS)}")
    if [BITS[c] for c in experts] != sorted((BITS[c] for c in experts), reverse=True):
        raise ValueError(f"experts {list(experts)}: highest precision first")


def parse_experts(s: str) -> tuple:
    """'16,4,2' or 'fp16,int4,int2' -> ('fp16', 'int4', 'int2')."""
    out = []
    for e in s.split(","):
        e = e.strip()
        out.append(CODEC_OF_BITS[int(e)] if e.isdigit() and int(e) in CODEC_OF_BITS else e)
    check_experts(out)
    return tuple(out)


class Router(torch.nn.Module):
    """n_router routers: w1, w2 [n_router][R][n_embd], w3 [n_router][E][R] (f32, no biases)."""

    def __init__(self, cfg: RouterConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        n, R, E, D = cfg.n_router, cfg.hidden, len(cfg.experts), cfg.n_embd
        # nn.Linear's default scale for w1/w2; a small w3 starts every router near uniform
        b = 1.0 / D ** 0.5
        self.w1 = torch.nn.Parameter((torch.rand(n, R, D, generator=generator) * 2 - 1) * b)
        self.w2 = torch.nn.Parameter((torch.rand(n, R, D, generator=generator) * 2 - 1) * b)
        self.w3 = torch.nn.Parameter(torch.randn(n, E, R, generator=generator) * 0.01)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., T, n_embd] (layer 0's input) -> [..., T, n_router, E]."""
        x = x.float()
        xh = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.cfg.norm_eps)
        a = torch.einsum("...d,grd->...gr", xh, self.w1)
        b = torch.einsum("...d,grd->...gr", xh, self.w2)
        return torch.einsum("...gr,ger->...ge", torch.nn.functional.silu(a) * b, self.w3)

    def chunk_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Training: [B][T][n_embd] -> p [B][n_router][n_chunks][E], the mean over each complete chunk's
        tokens of softmax(logit_t) (the soft counterpart of the vote)."""
        B, T, _ = x.shape
        C, n_c = self.cfg.chunk, T // self.cfg.chunk
        p = torch.softmax(self.logits(x[:, :n_c * C]), dim=-1)  # [B][T'][G][E]
        return p.reshape(B, n_c, C, *p.shape[-2:]).mean(2).transpose(1, 2)

    @torch.no_grad()
    def decisions(self, x: torch.Tensor) -> torch.Tensor:
        """The vote rule: [B][T][n_embd] -> expert index [B][n_router][n_chunks] of each complete chunk
        (freezing not applied: see assignment)."""
        B, T, _ = x.shape
        C, n_c, E = self.cfg.chunk, T // self.cfg.chunk, len(self.cfg.experts)
        votes = self.logits(x[:, :n_c * C]).argmax(-1)  # first maximum: ties -> lower j
        counts = torch.nn.functional.one_hot(votes, E).reshape(B, n_c, C, -1, E).sum(2)  # [B][n_c][G][E]
        return counts.argmax(-1).transpose(1, 2)  # first maximum: ties -> lower j

    def assignment(self, decisions: torch.Tensor) -> torch.Tensor:
        """Expert indices [B][n_router][n_chunks] -> codec indices (reference.CODECS) [B][n_chunks][n_layer],
        chunk 0 FP16 when freezing."""
        cfg = self.cfg
        codec_of = torch.tensor([CODEC_INDEX[c] for c in cfg.experts], dtype=torch.long)
        a = codec_of[decisions.cpu()]  # [B][G][n_c]
        layer_group = torch.arange(cfg.n_layer) // cfg.group_size
        a = a[:, layer_group].transpose(1, 2).contiguous()  # [B][n_c][n_layer]
        if cfg.freeze and a.shape[1]:
            a[:, 0] = CODEC_INDEX["fp16"]
        return a


# ------------------------------------------------------------------------------------------------
# loading (docs/ROUTER-FORMAT.md); written by export_router.py
# ------------------------------------------------------------------------------------------------

class RouterFormatError(ValueError):
    pass


def _get(r, key, kind):
    f = r.fields.get(key)
    if f is None:
        raise RouterFormatError(f"router: missing key {key}")
    v = f.contents()
    if kind is str and not isinstance(v, str) or kind in (int, float, bool) and isinstance(v, (list, str)) \
            or kind is list and not isinstance(v, list):
        raise RouterFormatError(f"router: key {key} has the wrong type")
    return v


def load_router(path: str, model=None) -> tuple:
    """(Router, metadata dict) from a router GGUF; with model (reference.LlamaModel) also checks it
    against the model as the runtime does (architecture, n_embd, n_layer, n_vocab, fingerprint)."""
    from gguf import GGUFReader

    from reference import model_fingerprint

    r = GGUFReader(path)
    if _get(r, "general.architecture", str) != ARCH:
        raise RouterFormatError(f"{path}: general.architecture is not {ARCH}")
    p = ARCH + "."
    meta = {k[len(p):]: f.contents() for k, f in r.fields.items() if k.startswith(p)}
    if _get(r, p + "format_version", int) != FORMAT_VERSION:
        raise RouterFormatError(f"{path}: format_version {meta['format_version']}, this reader knows {FORMAT_VERSION}")
    experts = tuple(_get(r, p + "experts.codec", list))
    bits = list(_get(r, p + "experts.bits", list))
    check_experts(experts)
    if bits != [BITS[c] for c in experts]:
        raise RouterFormatError(f"{path}: experts.bits {bits} disagree with experts.codec {list(experts)}")
    n_layer = int(_get(r, p + "base.n_layer", int))
    share = _get(r, p + "share", str)
    cfg = RouterConfig(n_embd=int(_get(r, p + "base.n_embd", int)), n_layer=n_layer, experts=experts,
                       chunk=int(_get(r, p + "chunk_size", int)), hidden=int(_get(r, p + "hidden_size", int)),
                       share=share, group_size=int(_get(r, p + "group_size", int)),
                       freeze=bool(_get(r, p + "freeze_first_chunk", bool)),
                       norm_eps=float(_get(r, p + "norm_eps", float)), input_layer=int(_get(r, p + "input_layer", int)))
    if cfg.group_size != int(meta["group_size"]) or cfg.n_router != int(_get(r, p + "n_router", int)):
        raise RouterFormatError(f"{path}: share {share}, group_size {meta['group_size']} and n_router "
                                f"{meta['n_router']} disagree (n_layer {n_layer})")
    if cfg.input_layer != 0:
        raise RouterFormatError(f"{path}: input_layer {cfg.input_layer}: version 1 routes from layer 0's input")
    for k in ("lambda", "expected_bits"):
        _get(r, p + k, float)
    for k in ("base.architecture", "base.fingerprint"):
        _get(r, p + k, str)
    _get(r, p + "base.n_vocab", int)
    router = Router(cfg)
    tens = {t.name: t for t in r.tensors}
    E, R, D = len(experts), cfg.hidden, cfg.n_embd
    with torch.no_grad():
        for g in range(cfg.n_router):
            for name, shape, param in (("w1", (R, D), router.w1), ("w2", (R, D), router.w2), ("w3", (E, R), router.w3)):
                t = tens.get(f"router.{g}.{name}")
                if t is None:
                    raise RouterFormatError(f"{path}: missing tensor router.{g}.{name}")
                a = np.asarray(t.data)
                if t.tensor_type.name != "F32" or tuple(a.shape) != shape:
                    raise RouterFormatError(f"{path}: router.{g}.{name} must be F32 {shape}, is "
                                            f"{t.tensor_type.name} {tuple(a.shape)}")
                param[g] = torch.from_numpy(a.astype(np.float32))
    if model is not None:
        hp = model.hp
        want = {"base.architecture": hp.arch, "base.n_embd": hp.n_embd, "base.n_layer": model.n_layer_full,
                "base.n_vocab": hp.n_vocab}
        for k, v in want.items():
            if meta[k] != v:
                raise RouterFormatError(f"{path}: router for {k} = {meta[k]}, the model has {v}: retrain the router "
                                        f"for this model (train/train_router.py)")
        if meta["base.fingerprint"] != model_fingerprint(model.path):
            raise RouterFormatError(f"{path}: base.fingerprint does not match the model's token embeddings: the "
                                    f"router was trained on another model; retrain it (train/train_router.py)")
    return router, meta
