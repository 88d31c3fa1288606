"""A tiny Stable Diffusion pipeline built from configs with random weights: no download, ~7 MB.

It exercises the real diffusers code paths (text encoder, UNet, VAE, scheduler; txt2img, img2img,
inpainting) on a CPU in a fraction of a second per image, for tests and for ``dfx demo``. Its images are
noise-like: they prove the plumbing, and as "fakes" they carry a real VAE decoder's up-sampling
fingerprint, nothing more.
"""

from __future__ import annotations

import os
from pathlib import Path


def _byte_tokenizer():
    """A CLIP tokenizer over a byte-level vocabulary held in memory (2 specials + 256 bytes + 256 word-ends)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_tiny_pipeline(out_dir: str | os.PathLike[str], *, seed: int = 0, inpainting: bool = False) -> Path:
    """Write a tiny pipeline with ``save_pretrained``; loadable offline by path through ``AutoPipelineFor*``.
    ``inpainting=True`` gives the UNet the 9 input channels of a dedicated inpainting model."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _byte_tokenizer()
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=9 if inpainting else 4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=(2, 4),
        norm_num_groups=32)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], norm_num_groups=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=32))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(out_dir)
    pipe.save_pretrained(out)
    return out
