"""A tiny, randomly initialised Qwen3-VL (video-language model) built entirely in code.

It is saved as an ordinary model folder (config, safetensors, tokenizer, image and video
processor configs, chat template, generation config), so `slapgen caption --model tiny` loads it
through exactly the `from_pretrained` calls a hub model goes through (model.py). Its words are
Power Slap vocabulary, and its generation config samples 60-90 words without repeating a
trigram, so its captions are domain word salad that passes the caption checks: enough to exercise
writing, resuming, curating and training on captioned clips. A run with a small
`--max-new-tokens` makes every caption too short, which exercises the retry and the flagging.
"""

from __future__ import annotations

from pathlib import Path

from slapgen.atomic import atomic_path

TINY_VLM_NAME = "tiny"
TINY_VLM_VERSION = "tiny-vlm-v1"  # bump when anything below changes so a stale folder is never reused
TINY_VLM_SEED = 20261128

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
_WORDS = (
    "power slap the striker defender athlete athletes in red blue black white shirt table stage arena crowd "
    "referee camera wide shot close-up static pans tracks slow motion replay frame plants his feet stance "
    "weight shifts back winds up draws open hand palm swings whips arm forward fast explosive rotates hips "
    "strikes lands flush on cheek jaw face head snaps sideways impact ripple skin sweat flies knees buckle "
    "staggers wobbles collapses knockout absorbs the blow braces holds ground resets left right across side "
    "before after then while with and of to at from into his their both lights bright loud force contact"
).split()
# Qwen's chat layout, reduced to what captioning sends: text and one video per user turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer.train_from_iterator([" ".join(_WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", *SPECIAL_TOKENS]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:],
                                   chat_template=CHAT_TEMPLATE)


def write_tiny_vlm(target: Path) -> Path:
    """Build the tiny model and write it to `target` atomically."""
    import torch
    from transformers import (GenerationConfig, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tokenizer = _tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1], patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(TINY_VLM_SEED)
    model = Qwen3VLForConditionalGeneration(config).eval()
    # A few frames of a few 32x32 cells each: the vision tower sees the clip, cheaply.
    pixels = {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, size=pixels),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, size=pixels, cap_pixels_per_frame=True),
        chat_template=CHAT_TEMPLATE,
    )
    model.generation_config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, min_new_tokens=60, max_new_tokens=90, no_repeat_ngram_size=3,
        eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        bad_words_ids=[[ids(token)] for token in ["<unk>", *SPECIAL_TOKENS]],
    )
    with atomic_path(target) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return target


def materialise_tiny_vlm(cache_dir: Path) -> Path:
    """Write the tiny model under `cache_dir` once; return its folder."""
    target = Path(cache_dir).expanduser() / TINY_VLM_VERSION
    if not (target / "config.json").is_file():
        write_tiny_vlm(target)
    return target
