"""Tiny Stable-Diffusion-shaped pipelines, built offline from configs.

Nothing here is trained: it gives CPU tests, the tiny config and the benchmarks real diffusers /
transformers components in the folder layout of the hub models (``unet`` or ``transformer``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``, ``model_index.json``), loaded back with the
same ``from_pretrained`` calls as the real models.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-character map of GPT-2/CLIP byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def save_byte_level_clip_tokenizer(path: str | Path, model_max_length: int = 77) -> Path:
    """Write a valid ``CLIPTokenizer`` with no merges: one token per byte (and per final byte).

    Vocabulary: 256 byte characters, the same with ``</w>``, then the two special tokens (514 ids).
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + list(SPECIAL_TOKENS)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=model_max_length
    )
    tokenizer.save_pretrained(path)
    return path


def save_character_t5_tokenizer(path: str | Path, model_max_length: int = 256) -> Path:
    """Write a valid ``T5TokenizerFast`` whose Unigram vocabulary is single characters.

    T5's own tokenizer is a SentencePiece model from the hub; this builds the same kind (a
    ``tokenizers`` Unigram model with T5's ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, SentencePiece's
    ``▁`` word boundary and ``</s>`` appended) offline: ids 3 .. 97 are ``▁`` and the printable
    ASCII characters, all of equal score, so every ASCII prompt splits into characters and anything
    else is ``<unk>``. No sentinel ``<extra_id_*>`` tokens (``extra_ids=0``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    path = Path(path)
    pieces = ["▁"] + [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -math.log(len(pieces))) for piece in pieces]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(tokenizer_object=backend, extra_ids=0, model_max_length=model_max_length)
    tokenizer.save_pretrained(path)
    return path


def _unet_kwargs(block_out_channels: tuple[int, ...], latent_size: int, layers_per_block: int) -> dict:
    n = len(block_out_channels)
    return {
        "sample_size": latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": block_out_channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        "attention_head_dim": 8,
        "norm_num_groups": 8,
    }


def _vae(block_out_channels: tuple[int, ...], resolution: int, latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=resolution,
        **extra,
    )


def _text_config(tokenizer, hidden_size: int, layers: int, intermediate_size: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
    )


def save_tiny_stable_diffusion(
    path: str | Path,
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    cross_attention_dim: int = 32,
    model_max_length: int = 16,
    prediction_type: str = "epsilon",
    seed: int = 0,
    vae_block_out_channels: tuple[int, ...] = (16, 32),
    resolution: int = 32,
    layers_per_block: int = 1,
    text_layers: int = 2,
    text_intermediate_size: int = 64,
) -> Path:
    """Save a randomly initialised SD1.5-shaped pipeline (VAE downsampling x2 per extra block).

    The UNet's ``sample_size`` is the latent side ``resolution / 2 ** (len(vae_block_out_channels) - 1)``;
    the text encoder has ``text_layers`` layers of width ``cross_attention_dim``.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    latent_size = resolution // 2 ** (len(vae_block_out_channels) - 1)
    unet = UNet2DConditionModel(
        **_unet_kwargs(block_out_channels, latent_size, layers_per_block),
        cross_attention_dim=cross_attention_dim,
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        save_byte_level_clip_tokenizer(path / "tokenizer", model_max_length)
    )
    text_config = _text_config(tokenizer, cross_attention_dim, text_layers, text_intermediate_size)
    pipeline = StableDiffusionPipeline(
        vae=_vae(vae_block_out_channels, resolution),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def save_tiny_sdxl(
    path: str | Path,
    *,
    block_out_channels: tuple[int, ...] = (32, 64),
    text_hidden_sizes: tuple[int, int] = (32, 32),
    projection_dim: int = 32,
    addition_time_embed_dim: int = 8,
    model_max_length: int = 16,
    prediction_type: str = "epsilon",
    seed: int = 0,
    vae_block_out_channels: tuple[int, ...] = (16, 32),
    resolution: int = 32,
    layers_per_block: int = 1,
    text_layers: int = 2,
    text_intermediate_size: int = 64,
) -> Path:
    """Save a randomly initialised SDXL-shaped pipeline, in the layout of
    ``stabilityai/stable-diffusion-xl-base-1.0`` (``text_encoder_2``, ``tokenizer_2`` added).

    As in SDXL, the UNet cross-attends to both encoders' hidden states concatenated
    (``cross_attention_dim = sum(text_hidden_sizes)``) and adds the embedding of the pooled text
    projection and the six micro-conditioning time ids
    (``projection_class_embeddings_input_dim = 6 * addition_time_embed_dim + projection_dim``).
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    torch.manual_seed(seed)
    latent_size = resolution // 2 ** (len(vae_block_out_channels) - 1)
    unet = UNet2DConditionModel(
        **_unet_kwargs(block_out_channels, latent_size, layers_per_block),
        cross_attention_dim=sum(text_hidden_sizes),
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim,
    )
    tokenizers = [
        CLIPTokenizer.from_pretrained(save_byte_level_clip_tokenizer(path / name, model_max_length))
        for name in ("tokenizer", "tokenizer_2")
    ]
    text_encoder = CLIPTextModel(
        _text_config(tokenizers[0], text_hidden_sizes[0], text_layers, text_intermediate_size)
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(
            tokenizers[1],
            text_hidden_sizes[1],
            text_layers,
            text_intermediate_size,
            projection_dim=projection_dim,
        )
    )
    pipeline = StableDiffusionXLPipeline(
        vae=_vae(vae_block_out_channels, resolution),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=_scheduler(prediction_type),
        add_watermarker=False,
    )
    pipeline.save_pretrained(path)
    return path


# SD3's VAE (``stabilityai/stable-diffusion-3-medium-diffusers``, ``vae/config.json``): 16 latent
# channels, latents ``(z - shift_factor) * scaling_factor``, no (post-)quant conv.
SD3_VAE_CONFIG = {
    "latent_channels": 16,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5305,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def save_tiny_sd3(
    path: str | Path,
    *,
    with_t5: bool = True,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 2,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    text_hidden_sizes: tuple[int, int] = (32, 32),
    projection_dims: tuple[int, int] = (32, 32),
    t5_hidden_size: int = 64,
    model_max_length: int = 16,
    t5_max_length: int = 256,
    shift: float = 3.0,
    seed: int = 0,
    vae_block_out_channels: tuple[int, ...] = (16, 32),
    resolution: int = 32,
    text_layers: int = 2,
    text_intermediate_size: int = 64,
) -> Path:
    """Save a randomly initialised SD3-shaped pipeline, in the layout of
    ``stabilityai/stable-diffusion-3-medium-diffusers`` (``transformer``, ``text_encoder{,_2,_3}``,
    ``tokenizer{,_2,_3}``).

    As in SD3 (Esser et al. 2024, arXiv 2403.03206, Fig. 2): the MMDiT's context is both CLIP
    encoders' penultimate hidden states concatenated, zero-padded to the T5 width and followed by
    the T5 sequence (``joint_attention_dim = t5_hidden_size >= sum(text_hidden_sizes)``); its pooled
    conditioning is the two CLIP projections (``pooled_projection_dim = sum(projection_dims)``);
    ``caption_projection_dim`` is the transformer width ``num_attention_heads * attention_head_dim``.
    ``with_t5=False`` saves ``text_encoder_3 = tokenizer_3 = None``, which the pipeline replaces by
    zeros (SD3's "drop T5" mode); diffusers (0.42) does not list them as optional components, so
    such a folder, like the hub's SD3 without T5, loads with
    ``from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``. ``dual_attention_layers`` and ``qk_norm="rms_norm"`` give the SD3.5
    (MMDiT-X) blocks. The VAE is ``SD3_VAE_CONFIG`` at tiny widths; the scheduler
    ``FlowMatchEulerDiscreteScheduler(shift=shift)``, 3.0 as SD3. The transformer's ``sample_size``
    is the latent side ``resolution / 2 ** (len(vae_block_out_channels) - 1)``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    if t5_hidden_size < sum(text_hidden_sizes):
        raise ValueError(
            f"t5_hidden_size ({t5_hidden_size}) must be >= the CLIP widths' sum {sum(text_hidden_sizes)}"
        )
    path = Path(path)
    torch.manual_seed(seed)
    latent_size = resolution // 2 ** (len(vae_block_out_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent_size,
        patch_size=patch_size,
        in_channels=SD3_VAE_CONFIG["latent_channels"],
        out_channels=SD3_VAE_CONFIG["latent_channels"],
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        joint_attention_dim=t5_hidden_size,
        caption_projection_dim=num_attention_heads * attention_head_dim,
        pooled_projection_dim=sum(projection_dims),
        pos_embed_max_size=latent_size // patch_size,
        dual_attention_layers=dual_attention_layers,
        qk_norm=qk_norm,
    )
    tokenizers = [
        CLIPTokenizer.from_pretrained(save_byte_level_clip_tokenizer(path / name, model_max_length))
        for name in ("tokenizer", "tokenizer_2")
    ]
    text_encoders = [
        CLIPTextModelWithProjection(
            _text_config(tokenizer, hidden, text_layers, text_intermediate_size, projection_dim=projection)
        )
        for tokenizer, hidden, projection in zip(tokenizers, text_hidden_sizes, projection_dims, strict=True)
    ]
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        from transformers import T5TokenizerFast

        tokenizer_3 = T5TokenizerFast.from_pretrained(
            save_character_t5_tokenizer(path / "tokenizer_3", t5_max_length)
        )
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=t5_hidden_size,
                d_kv=t5_hidden_size // 4,
                d_ff=2 * t5_hidden_size,
                num_layers=text_layers,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id,
            )
        )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=_vae(vae_block_out_channels, resolution, **SD3_VAE_CONFIG),
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(path)
    return path
