"""How much of a shapes image survives the VAE: detector accuracy on reconstructions.

Usage: python bench/vae_recon.py [MODEL] [--n 300] [--seed 123]
The generated images can be no better than what the VAE can reproduce, so this bounds the eval.
"""

from __future__ import annotations

import argparse
import json

import torch

from diffusekit.checkpoints.load import load_model
from diffusekit.cli_generate import default_model_path
from diffusekit.data.shapes import ShapesDataset
from diffusekit.eval.detector import compare_to_scene, detect
from diffusekit.images import to_pil, to_tensor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="default: the bundled model")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    loaded = load_model(args.model or default_model_path(), dtype=torch.float32)
    vae = loaded.model.vae
    data = ShapesDataset(seed=args.seed, size=loaded.cfg.resolution, length=args.n)
    correct, original = 0, 0
    with torch.inference_mode():
        for i in range(args.n):
            sample = data[i]
            recon = to_pil(vae.decode(vae.encode(to_tensor(sample.image)).mode()))[0]
            correct += not compare_to_scene(detect(recon), sample.scene)
            original += not compare_to_scene(detect(sample.image), sample.scene)
    print(json.dumps({"model": str(loaded.path), "images": args.n, "detector_on_originals": original / args.n,
                      "detector_on_vae_reconstructions": correct / args.n}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
