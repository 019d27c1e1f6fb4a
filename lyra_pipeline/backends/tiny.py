"""Tiny random-initialised diffusers checkpoints in the layouts of real ones (for tests and benchmarks).

``make_tiny_wan(path)`` writes a complete ``WanPipeline`` / ``WanImageToVideoPipeline`` folder (transformer, VAE,
UMT5 text encoder, a word-level tokenizer, flow-matching scheduler, ``model_index.json``) with a few hundred
thousand parameters, built offline. The pipeline code that loads real checkpoints loads these unchanged.
"""

from __future__ import annotations

from pathlib import Path


def make_tiny_tokenizer():
    """A word-level fast tokenizer built in code (no download): lowercase words, 256 ids, pad/eos/unk."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(253)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def make_tiny_wan(path: str | Path, *, i2v: bool = False, seed: int = 0) -> Path:
    """Write a tiny Wan 2.x pipeline folder (T2V base: 16 input channels; ``i2v``: 36 = 16 + 4 mask + 16)."""
    import torch
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanImageToVideoPipeline,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    z = 16
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=2 * z + 4 if i2v else z,
        out_channels=z, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                               num_heads=2, relative_attention_num_buckets=8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cls = WanImageToVideoPipeline if i2v else WanPipeline
    extra = {"image_encoder": None, "image_processor": None} if i2v else {}
    pipe = cls(tokenizer=make_tiny_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=scheduler, **extra)
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_depth(path: str | Path, *, kind: str = "relative", seed: int = 0) -> Path:
    """Write a tiny random Depth Anything model (Dinov2 backbone, DPT head) with its image processor."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    torch.manual_seed(seed)
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, depth_estimation_type=kind, max_depth=20)
    path = Path(path)
    DepthAnythingForDepthEstimation(config).save_pretrained(path)
    DPTImageProcessor(size={"height": 56, "width": 56}, keep_aspect_ratio=False, ensure_multiple_of=14,
                      do_pad=False).save_pretrained(path)
    return path


def make_tiny_pixart(path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random PixArt-Sigma text-to-image pipeline (transformer, VAE, T5 encoder, tokenizer)."""
    import torch
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single", use_additional_conditions=False,
    )  # fmt: skip
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        layers_per_block=1)
    text_encoder = T5EncoderModel(T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    pipe = PixArtSigmaPipeline(tokenizer=make_tiny_tokenizer(), text_encoder=text_encoder, vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def make_tiny_cogvideox(path: str | Path, *, i2v: bool = False, seed: int = 0) -> Path:
    """Write a tiny random CogVideoX 1.0 pipeline (T2V: 16 input channels; ``i2v``: 32 = 16 + 16 first frame)."""
    import torch
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=32 if i2v else 16, out_channels=16,
        time_embed_dim=8, text_embed_dim=32, num_layers=1, sample_width=8, sample_height=8, sample_frames=9,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=16, use_rotary_positional_embeddings=True,
    )  # fmt: skip
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 4,
                                 up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                                 latent_channels=16, layers_per_block=1, norm_num_groups=2,
                                 temporal_compression_ratio=4)
    text_encoder = T5EncoderModel(T5Config(vocab_size=256, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    cls = CogVideoXImageToVideoPipeline if i2v else CogVideoXPipeline
    pipe = cls(tokenizer=make_tiny_tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=CogVideoXDDIMScheduler())
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path
