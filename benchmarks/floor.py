"""The marginal LL's matmul floor: the seconds this machine's numpy float32 product needs for
the decoder's FLOPs, numpy and nothing else (importable without torch).

The floor is timed in the scvi-onnx worker right after each marginal-LL repeat (same process,
same cores, same moment): on a shared VM the product's speed drifts by 2x within minutes, and a
floor timed at another moment than the job it divides would carry that drift into the ratio.
"""

from __future__ import annotations

import time

import numpy as np


def decoder_flops_per_row(config: dict) -> int:
    """FLOPs per (sample, cell) of the decoder's products.

    The gene-sized heads: px_scale (+ ZINB's dropout, + gene-cell dispersion) for SCVI and its
    kin; PEAKVI's one region-sized output layer; TOTALVI's four trunks, gene heads and four
    protein heads."""
    L, H, G = config["n_latent"], config["n_hidden"], config["n_input"]
    lik, dispersion = config.get("gene_likelihood"), config.get("dispersion")
    heads = 1 + (lik == "zinb") + (dispersion == "gene-cell")
    n_layers = config.get("n_layers_decoder", config.get("n_layers"))
    if config.get("module_class") == "TOTALVAE":
        # DecoderTOTALVI: four trunks (genes, background, foreground, mixing) of
        # n_layers_decoder layers, gene heads and four protein heads on [hidden, z]
        P = config["n_proteins"]
        trunks = 4 * (L * H + (n_layers - 1) * H * H)
        return 2 * (trunks + (H + L) * (G * heads + 4 * P))
    return 2 * (L * H + (n_layers - 1) * H * H + H * G * heads)


def matmul_floor(config: dict, rows: int, repeats: int = 5) -> dict:
    """Time numpy's ``(8192, n_hidden) @ (n_hidden, n_input)`` float32 product (the fastest of
    ``repeats``, after a warm-up) and scale it to the decoder's FLOPs on ``rows``."""
    H, G = config["n_hidden"], config["n_input"]
    a = np.random.default_rng(0).standard_normal((8192, H), dtype=np.float32)
    w = np.random.default_rng(1).standard_normal((H, G), dtype=np.float32)
    a @ w
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ w
        ts.append(time.perf_counter() - t)
    gflops = 2 * 8192 * H * G / min(ts) / 1e9
    total = decoder_flops_per_row(config) * rows
    return {"gflops": gflops, "decoder_gflop": total / 1e9, "floor_s": total / (gflops * 1e9)}
