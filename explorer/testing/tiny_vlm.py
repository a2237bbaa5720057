"""Tiny vision-language models of every supported family, built locally from configs.

For tests and plugin authors: a word-level tokenizer (``tokenizers`` WordLevel wrapped in
``PreTrainedTokenizerFast``) with the special tokens each family's processor needs, the family's
own image processor at small sizes, and a tiny config (a few thousand parameters). Nothing is
downloaded. :func:`make_tiny_vlm` also builds the model with random weights and saves model and
processor with ``save_pretrained`` so that they load through ``from_pretrained``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

BACKGROUND, MARK = 40, 250
WORDS = ("describe", "the", "image", "please")


# ----------------------------------------------------------------------------- building blocks


def word_tokenizer(special: list[str], extra: dict[str, str] | None = None, newline: bool = False):
    """A whitespace word-level tokenizer whose special tokens are matched anywhere in the text."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {w: i for i, w in enumerate(base + [s for s in special if s not in base] + list(WORDS))}
    if newline:
        vocab["\n"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in base + special])
    if newline:
        tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens=extra or {},
    )


def tiny_text(kind: str, vocab: int):
    from transformers import LlamaConfig, Qwen2Config

    kw = dict(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2Config(**kw) if kind == "qwen2" else LlamaConfig(**kw)


def clip_vision(image_size: int, patch: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=patch, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, projection_dim=16)


@dataclass
class Variant:
    name: str
    family: str
    build: Callable[[], tuple[Any, Any]]  # -> (processor, config)
    prompt: str


def build_demo():
    from explorer.demo import vlm_model

    return vlm_model.build_processor(), vlm_model.build_config()


def build_llava_crop():
    """LLaVA-1.5 style: CLIP shortest-edge resize + center crop, CLS dropped."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=clip_vision(32, 8), text_config=tiny_text("llama", len(tok)),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16,
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    return proc, cfg


def build_llava_pad_full():
    """LlavaImageProcessor with pad-to-square, and the CLS feature kept ("full")."""
    from transformers import LlavaConfig, LlavaImageProcessor, LlavaProcessor

    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    ip = LlavaImageProcessor(do_pad=True, size={"height": 32, "width": 32}, do_center_crop=False)
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                          vision_feature_select_strategy="full", num_additional_image_tokens=1)
    cfg = LlavaConfig(vision_config=clip_vision(32, 8), text_config=tiny_text("llama", len(tok)),
                      image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=17,
                      vision_feature_select_strategy="full", vision_feature_layer=-1)
    return proc, cfg


NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]


def build_llava_next():
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    tok = word_tokenizer(["<image>"], {"image_token": "<image>"})
    ip = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                 image_grid_pinpoints=NEXT_PINPOINTS)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)
    cfg = LlavaNextConfig(vision_config=clip_vision(32, 8), text_config=tiny_text("llama", len(tok)),
                          image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=NEXT_PINPOINTS,
                          vision_feature_select_strategy="default", vision_feature_layer=-1)
    return proc, cfg


OV_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32], [64, 96], [96, 64], [96, 96]]


def build_llava_onevision():
    """SigLIP tower (no CLS), anyres_max_2 so that larger tile grids are downscaled."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, SiglipVisionConfig)

    tok = word_tokenizer(["<image>", "<video>"], {"image_token": "<image>", "video_token": "<video>"})
    ip = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, image_grid_pinpoints=OV_PINPOINTS)
    proc = LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok, video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=16, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_2")
    vis = SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2)
    cfg = LlavaOnevisionConfig(vision_config=vis, text_config=tiny_text("qwen2", len(tok)),
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               image_grid_pinpoints=OV_PINPOINTS, vision_aspect_ratio="anyres_max_2",
                               vision_feature_select_strategy="full", vision_feature_layer=-1)
    return proc, cfg


QWEN_PROMPT = "<|vision_start|><|image_pad|><|vision_end|> describe"
QWEN_SPECIAL = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]


def _qwen(version: str):
    from transformers import Qwen2VLImageProcessor

    tok = word_tokenizer(QWEN_SPECIAL, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
    ip = Qwen2VLImageProcessor(min_pixels=16 * 16 * 4, max_pixels=16 * 16 * 24, patch_size=8, merge_size=2,
                               temporal_patch_size=2)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if version == "2":
        from transformers import Qwen2VLConfig, Qwen2VLProcessor, Qwen2VLVideoProcessor

        vision = dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2)
        cfg = Qwen2VLConfig(vision_config=vision, text_config=text, **common)
        proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

        vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16, patch_size=8,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1])
        cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **common)
        proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor())
    return proc, cfg


IDEFICS_SPECIAL = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + [
    f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)
]


def build_idefics3():
    """Tiles of 32 px, 4 px patches, pixel shuffle 2: 4x4 = 16 tokens per view."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tok = word_tokenizer(IDEFICS_SPECIAL, newline=True)
    ip = Idefics3ImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16)
    cfg = Idefics3Config(
        vision_config=dict(image_size=32, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        text_config=tiny_text("llama", len(tok)), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return proc, cfg


def build_idefics3_odd():
    """``size`` not a multiple of the tile: ``resize_for_vision_encoder`` derives the short side
    from the rounded-up long side, so a 60x100 image becomes 96x128 (3x4 tiles), while
    ``get_number_of_image_patches`` would say 2x4."""
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor

    tok = word_tokenizer(IDEFICS_SPECIAL, newline=True)
    ip = Idefics3ImageProcessor(size={"longest_edge": 100}, max_image_size={"longest_edge": 32})
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16)
    cfg = Idefics3Config(
        vision_config=dict(image_size=32, patch_size=4, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        text_config=tiny_text("llama", len(tok)), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return proc, cfg


def build_smolvlm():
    """Tiles of 48 px, 8 px patches, pixel shuffle 2: 3x3 = 9 tokens per view."""
    from transformers import SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    tok = word_tokenizer(IDEFICS_SPECIAL + ["<video>"], newline=True)
    ip = SmolVLMImageProcessor(size={"longest_edge": 96}, max_image_size={"longest_edge": 48})
    proc = SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=SmolVLMVideoProcessor(), image_seq_len=9)
    cfg = SmolVLMConfig(
        vision_config=dict(image_size=48, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2),
        text_config=tiny_text("llama", len(tok)), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return proc, cfg


VARIANTS = {
    v.name: v
    for v in [
        Variant("demo", "llava", build_demo, "<image> describe the scene"),
        Variant("llava-crop", "llava", build_llava_crop, "<image> describe the image"),
        Variant("llava-pad-full", "llava", build_llava_pad_full, "<image> describe the image"),
        Variant("llava_next", "llava_next", build_llava_next, "<image> describe the image"),
        Variant("llava_onevision", "llava_onevision", build_llava_onevision, "<image> describe the image"),
        Variant("qwen2_vl", "qwen2_vl", lambda: _qwen("2"), QWEN_PROMPT),
        Variant("qwen2_5_vl", "qwen2_5_vl", lambda: _qwen("2.5"), QWEN_PROMPT),
        Variant("idefics3", "idefics3", build_idefics3, "<image> describe the image"),
        Variant("idefics3-odd", "idefics3", build_idefics3_odd, "<image> describe the image"),
        Variant("smolvlm", "smolvlm", build_smolvlm, "<image> describe the image"),
    ]
}




def make_tiny_vlm(folder: str | Path, name: str = "demo", seed: int = 0):
    """Build variant ``name`` with random weights, save model and processor into ``folder`` with
    ``save_pretrained`` and return the :class:`~explorer.backends.specs.VlmSpec` that loads them."""
    import torch
    from transformers import AutoModelForImageTextToText

    from explorer.backends.specs import VlmSpec

    variant = VARIANTS[name]
    processor, config = variant.build()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return VlmSpec(model=str(folder), device="cpu")


_REMOTE_CONFIGURATION = '''"""Configuration of a model that ships its own code (an explorer test fixture)."""
from pathlib import Path

Path({marker!r}).write_text("configuration_x imported")

from transformers import PretrainedConfig


class XConfig(PretrainedConfig):
    model_type = "explorer_remote_x"

    def __init__(self, hidden_size=8, **kwargs):
        self.hidden_size = hidden_size
        super().__init__(**kwargs)
'''

_REMOTE_MODELING = '''"""A model that ships its own code (an explorer test fixture)."""
from pathlib import Path

Path({marker!r}).write_text("modeling_x imported")

import torch
from transformers import PreTrainedModel

from .configuration_x import XConfig


class XModel(PreTrainedModel):
    config_class = XConfig

    def __init__(self, config):
        super().__init__(config)
        self.proj = torch.nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def forward(self, pixel_values=None, input_ids=None, **kwargs):
        return self.proj(pixel_values)
'''


def make_remote_code_vlm(folder: str | Path, marker: str | Path):
    """A model folder that needs its own code: ``config.json`` with an ``auto_map`` naming
    ``configuration_x.XConfig`` and ``modeling_x.XModel`` (a tiny ``PretrainedConfig`` and
    ``PreTrainedModel`` written next to it) under a ``model_type`` transformers does not know.
    Importing either module writes ``marker``, so a test can tell whether any of that code ran.
    Returns the :class:`~explorer.backends.specs.VlmSpec` of the folder (code not trusted)."""
    import json

    from explorer.backends.specs import VlmSpec

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "configuration_x.py").write_text(_REMOTE_CONFIGURATION.format(marker=str(marker)))
    (folder / "modeling_x.py").write_text(_REMOTE_MODELING.format(marker=str(marker)))
    config = {"model_type": "explorer_remote_x", "architectures": ["XModel"], "hidden_size": 8,
              "auto_map": {"AutoConfig": "configuration_x.XConfig", "AutoModel": "modeling_x.XModel",
                           "AutoModelForImageTextToText": "modeling_x.XModel"}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return VlmSpec(model=str(folder), device="cpu")
