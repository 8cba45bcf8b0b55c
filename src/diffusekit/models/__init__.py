"""The networks: U-Net, AutoencoderKL, CLIP text encoders, tokenizer."""
