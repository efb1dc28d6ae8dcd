"""export_router.py — write a MoQAE router GGUF exactly as docs/ROUTER-FORMAT.md (version 1) specifies,
with gguf.GGUFWriter. train/train_router.py calls write_router(); router.load_router() reads it back.

CLI: an untrained router with random weights, for runtime tests (decisions vary from chunk to chunk):
  python train/export_router.py -m MODEL.gguf --experts 16,4,2 [--share all|G|none] [--chunk-size 32]
      [--hidden 32] [--no-freeze] [--seed 0] [--scale 4] -o random-router.gguf
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
from gguf import GGUFValueType, GGUFWriter

from router import ARCH, BITS, FORMAT_VERSION, Router, RouterConfig, parse_experts


def base_info(model) -> dict:
    """The base.* keys for a reference.LlamaModel (the fingerprint hashes the model file's token_embd)."""
    from reference import model_fingerprint

    return {"architecture": model.hp.arch, "n_embd": model.hp.n_embd, "n_layer": model.n_layer_full,
            "n_vocab": model.hp.n_vocab, "fingerprint": model_fingerprint(model.path)}


def write_router(path: str, router: Router, base: dict, lambda_: float, expected_bits: float,
                 calibration: str | None = None, demote_weight=None) -> None:
    """demote_weight: None, or n_layer positive floats (the optional key moqae-router.demote_weight)."""
    cfg = router.cfg
    if base["n_embd"] != cfg.n_embd or base["n_layer"] != cfg.n_layer:
        raise ValueError("router shape does not match the base model")
    p = ARCH + "."
    w = GGUFWriter(path, arch=ARCH)
    w.add_uint32(p + "format_version", FORMAT_VERSION)
    w.add_uint32(p + "chunk_size", cfg.chunk)
    w.add_key_value(p + "experts.codec", list(cfg.experts), GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_key_value(p + "experts.bits", [BITS[c] for c in cfg.experts], GGUFValueType.ARRAY,
                    sub_type=GGUFValueType.UINT32)
    w.add_bool(p + "freeze_first_chunk", bool(cfg.freeze))
    w.add_string(p + "share", cfg.share)
    w.add_uint32(p + "group_size", cfg.group_size)
    w.add_uint32(p + "n_router", cfg.n_router)
    w.add_uint32(p + "input_layer", cfg.input_layer)
    w.add_uint32(p + "hidden_size", cfg.hidden)
    w.add_float32(p + "norm_eps", float(cfg.norm_eps))
    w.add_float32(p + "lambda", float(lambda_))
    w.add_float32(p + "expected_bits", float(expected_bits))
    w.add_string(p + "base.architecture", base["architecture"])
    w.add_uint32(p + "base.n_embd", int(base["n_embd"]))
    w.add_uint32(p + "base.n_layer", int(base["n_layer"]))
    w.add_uint32(p + "base.n_vocab", int(base["n_vocab"]))
    w.add_string(p + "base.fingerprint", base["fingerprint"])
    if calibration:
        w.add_string(p + "calibration", calibration)
    if demote_weight is not None:
        dw = [float(x) for x in demote_weight]
        if len(dw) != cfg.n_layer or not all(0.0 < x <= 1e6 for x in dw):
            raise ValueError("demote_weight needs one weight in (0, 1e6] per layer")
        w.add_key_value(p + "demote_weight", dw, GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
    with torch.no_grad():
        for g in range(cfg.n_router):
            for name in ("w1", "w2", "w3"):
                a = getattr(router, name)[g].detach().cpu().numpy().astype(np.float32)
                w.add_tensor(f"router.{g}.{name}", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def share_config(share: str, n_layer: int) -> dict:
    """--share all | none | G (an integer: layers per group) -> RouterConfig's share and group_size."""
    if share in ("all", "none"):
        return {"share": share, "group_size": 0}
    G = int(share)
    if G == n_layer:
        return {"share": "all", "group_size": 0}
    if G == 1:
        return {"share": "none", "group_size": 0}
    return {"share": "group", "group_size": G}


def main(argv=None):
    from reference import LlamaModel

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--experts", default="16,4,2")
    ap.add_argument("--share", default="all")
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--no-freeze", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scale", type=float, default=4.0, help="std of w3 (large: confident, varied votes)")
    ap.add_argument("--expected-bits", type=float, default=0.0,
                    help="written as is; 0 (the default for an untrained router) makes the runtime size the ring "
                         "for every chunk at the first expert")
    a = ap.parse_args(argv)
    m = LlamaModel(a.model, n_layer=0)
    experts = parse_experts(a.experts)
    cfg = RouterConfig(n_embd=m.hp.n_embd, n_layer=m.n_layer_full, experts=experts, chunk=a.chunk_size,
                       hidden=a.hidden, freeze=not a.no_freeze, norm_eps=m.hp.rms_eps,
                       **share_config(a.share, m.n_layer_full))
    gen = torch.Generator().manual_seed(a.seed)
    r = Router(cfg, generator=gen)
    with torch.no_grad():
        r.w3.copy_(torch.randn(r.w3.shape, generator=gen) * a.scale)
    write_router(a.out, r, base_info(m), 0.0, a.expected_bits, calibration=None)
    print(f"wrote {a.out}: random router, experts {list(experts)}, {cfg.n_router} router(s)")


if __name__ == "__main__":
    main()
