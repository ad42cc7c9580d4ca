"""Synthetic SFT / aligned model pairs in the real Hugging Face Llama layout, for tests, demos and benchmarks.

Weights are written straight into pre-sized safetensors files, a row chunk at a time, so memory stays
bounded (tens of MiB) whatever the model size; no model is ever built. Same arguments → identical bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import shutil
import sys
from collections import OrderedDict

import torch

from ..formats.dtypes import TORCH_NAMES, itemsize, torch_dtype
from ..formats.folder import INDEX, shard_name
from ..formats.safetensors import alignment_order, layout
from .reference import load_model

CHUNK_ELEMS = 1 << 22  # 4 Mi elements per chunk: ≤ ~48 MiB of temporaries (two f32, two of the output dtype)
BUFFER_NAME = "model.extra_buffer.position_ids"
BUFFER_LEN = 64
# id 0..3: unk, bos, eos, pad; then chat role tokens
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = ("the of and to a in is you that it he was for on are as with his they i at be this have from or one "
         "had by word but not what all were we when your can said there use an each which she do how their if "
         "will up other about out many then them these so some her would make like him into time has look two "
         "more write go see number no way could people my than first water been call who oil its now find long "
         "down day did get come made may part hello world model merge weight tensor . , ! ? : ; ' \" ( ) - "
         "0 1 2 3 4 5 6 7 8 9").split()
ALIGNED_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
                    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SFT_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:{% endif %}")


def llama_shapes(hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, vocab_size,
                 tie_word_embeddings) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM's saved state_dict, in state_dict order."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size {hidden_size} must divide by num_heads {num_heads}, "
                         f"and num_heads by num_kv_heads {num_kv_heads}")
    h, i, kv = hidden_size, intermediate_size, num_kv_heads * (hidden_size // num_heads)
    shapes = {"model.embed_tokens.weight": (vocab_size, h)}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i),
                       p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    if not tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab_size, h)
    return shapes


def mistral7b_shapes_kwargs(num_layers=8) -> dict:
    """make_pair kwargs for Mistral-7B shapes (8 layers ≈ 4.0 GB per model in bf16)."""
    return dict(hidden_size=4096, intermediate_size=14336, num_layers=num_layers, num_heads=32, num_kv_heads=8,
                vocab_size=32000, tie_word_embeddings=False)


def parse_size(text) -> int:
    """'5GB' → 5·10⁹, '64MiB' → 64·2²⁰, '1000000' → 10⁶ (the merger's own parser; ValueError for argparse)."""
    from ..errors import ExpoError
    from ..planning.plan import parse_size as parse

    try:
        return parse(text)
    except ExpoError as e:
        raise ValueError(f"bad size {text!r}: use e.g. 5GB, 64MiB or 1000000") from e


def _seed(seed: int, *parts) -> int:
    h = hashlib.blake2b(repr((seed,) + parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _shard(items: list[tuple[str, int]], limit) -> list[list[str]]:
    """Walk (name, nbytes) in order; a new shard starts when the next tensor would exceed limit."""
    shards, cur, size = [], [], 0
    for name, nb in items:
        if cur and limit is not None and size + nb > limit:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    return shards + [cur] if cur else shards


def _write_model_files(folder: pathlib.Path, specs: dict[str, tuple[str, tuple]], limit) -> dict:
    """Lay out and pre-size this model's safetensors files (in safetensors' own order, formats.safetensors);
    return name → (fd, absolute data offset)."""
    nbytes = {n: math.prod(s) * itemsize(TORCH_NAMES[d]) for n, (d, s) in specs.items()}
    shards = _shard([(n, nbytes[n]) for n in specs], limit)
    where, weight_map = {}, {}
    for k, names in enumerate(shards):
        fname = shard_name(k, len(shards))
        lay = layout(alignment_order([(n, TORCH_NAMES[specs[n][0]], specs[n][1]) for n in names]))
        fd = os.open(folder / fname, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(fd, lay.header, 0)
        os.ftruncate(fd, lay.size)
        for n, entry in lay.tensors.items():
            where[n] = (fd, entry.begin)
            weight_map[n] = fname
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(nbytes.values())}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return where


def _pwrite(fd: int, t: torch.Tensor, offset: int) -> None:
    buf = memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")
    while len(buf):
        n = os.pwrite(fd, buf, offset)
        buf, offset = buf[n:], offset + n


def _fill_pair(name, shape, tdt, where_s, where_a, vocab_size, seed, delta_scale):
    """Generate sft (rows < vocab_size for the sft) and aligned rows chunk by chunk; write both."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    row_bytes = cols * tdt.itemsize
    step = max(1, CHUNK_ELEMS // max(cols, 1))
    is_norm = len(shape) == 1
    sft_rows = min(rows, vocab_size) if name in ("model.embed_tokens.weight", "lm_head.weight") else rows
    g_s = torch.Generator().manual_seed(_seed(seed, name, "sft"))
    g_d = torch.Generator().manual_seed(_seed(seed, name, "delta"))
    g_x = torch.Generator().manual_seed(_seed(seed, name, "extra"))
    r = 0
    while r < rows:
        n = min(step, (sft_rows if r < sft_rows else rows) - r)
        cshape = (n,) + tuple(shape[1:])
        if r < sft_rows:
            x = torch.randn(cshape, generator=g_s).mul_(0.02)
            if is_norm:
                x.add_(1.0)
            s = x.to(tdt)
            _pwrite(where_s[0], s, where_s[1] + r * row_bytes)
            x = s.float()  # the rounded sft value (a copy also for float32)
            x.add_(torch.randn(cshape, generator=g_d).mul_(delta_scale))
        else:  # rows added to the vocabulary during alignment
            x = torch.randn(cshape, generator=g_x).mul_(0.02)
        _pwrite(where_a[0], x.to(tdt), where_a[1] + r * row_bytes)
        r += n


def _write_tokenizer(folder: pathlib.Path, vocab_size: int, chat_template: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [w for w in WORDS if w not in SPECIALS]
    words = words[:vocab_size] + [f"<tok_{k}>" for k in range(len(words), vocab_size)]
    tok = Tokenizer(models.WordLevel(vocab={w: k for k, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIALS[4:])
    fast.chat_template = chat_template
    fast.save_pretrained(str(folder))
    if len(fast) != vocab_size:
        raise AssertionError(f"tokenizer has {len(fast)} tokens, expected {vocab_size}")
    (folder / "chat_template.jinja").write_text(chat_template)  # transformers < 5 keeps it in the config
    if not (folder / "special_tokens_map.json").exists():  # transformers 5 no longer writes it
        stm = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
               "additional_special_tokens": SPECIALS[4:]}
        (folder / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


def _write_configs(folder: pathlib.Path, dtype: str, vocab_size: int, kw: dict) -> None:
    import transformers
    from transformers import GenerationConfig, LlamaConfig

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    cfg = LlamaConfig(hidden_size=kw["hidden_size"], intermediate_size=kw["intermediate_size"],
                      num_hidden_layers=kw["num_layers"], num_attention_heads=kw["num_heads"],
                      num_key_value_heads=kw["num_kv_heads"], vocab_size=vocab_size,
                      tie_word_embeddings=kw["tie_word_embeddings"], bos_token_id=1, eos_token_id=2,
                      pad_token_id=3, max_position_embeddings=4096, architectures=["LlamaForCausalLM"],
                      **{key: dtype})
    cfg.save_pretrained(str(folder))
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(str(folder))


def make_pair(out_dir, *, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              vocab_size=256, extra_vocab=0, dtype="bfloat16", tie_word_embeddings=False,
              nonfloat_buffer=False, sft_shard_bytes=None, aligned_shard_bytes=None, seed=0,
              delta_scale=0.01) -> tuple[pathlib.Path, pathlib.Path]:
    """Create out_dir/sft and out_dir/aligned; return (sft_dir, aligned_dir).

    sft weights: normal·0.02 (norm weights 1 + normal·0.02); aligned = sft + delta_scale·normal, both rounded
    to dtype. extra_vocab rows (aligned embed_tokens / lm_head only) are fresh normal·0.02. shard_bytes:
    max data bytes per shard (None → one model.safetensors).
    """
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype {dtype!r}: use bfloat16, float16 or float32")
    if vocab_size < len(SPECIALS) or extra_vocab < 0 or min(hidden_size, intermediate_size, num_heads,
                                                            num_kv_heads) < 1 or num_layers < 0:
        raise ValueError(f"bad sizes: vocab_size ≥ {len(SPECIALS)}, extra_vocab ≥ 0, positive dimensions")
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little endian; this generator needs a little-endian host")
    for lim in (sft_shard_bytes, aligned_shard_bytes):
        if lim is not None and lim <= 0:
            raise ValueError(f"shard size {lim}: must be positive")
    kw = dict(hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers,
              num_heads=num_heads, num_kv_heads=num_kv_heads, tie_word_embeddings=tie_word_embeddings)
    out = pathlib.Path(out_dir)
    dirs = out / "sft", out / "aligned"
    specs = []
    for folder, vocab in zip(dirs, (vocab_size, vocab_size + extra_vocab)):
        folder.mkdir(parents=True, exist_ok=True)
        for old in list(folder.glob("model*.safetensors")) + list(folder.glob(INDEX)):
            old.unlink()
        sp = {n: (dtype, s) for n, s in llama_shapes(vocab_size=vocab, **kw).items()}
        if nonfloat_buffer:
            sp[BUFFER_NAME] = ("int64", (BUFFER_LEN,))
        specs.append(sp)
    where_s = _write_model_files(dirs[0], specs[0], sft_shard_bytes)
    where_a = _write_model_files(dirs[1], specs[1], aligned_shard_bytes)
    try:
        for name, (dt, shape) in specs[1].items():
            if dt == "int64":
                buf = torch.arange(shape[0], dtype=torch.int64)
                for fd, off in (where_s[name], where_a[name]):
                    _pwrite(fd, buf, off)
            else:
                _fill_pair(name, shape, torch_dtype(TORCH_NAMES[dt]), where_s[name], where_a[name], vocab_size, seed,
                           delta_scale)
    finally:
        for fd in {fd for fd, _ in list(where_s.values()) + list(where_a.values())}:
            os.close(fd)
    for folder, vocab, tmpl in zip(dirs, (vocab_size, vocab_size + extra_vocab), (SFT_TEMPLATE, ALIGNED_TEMPLATE)):
        _write_configs(folder, dtype, vocab, kw)
        _write_tokenizer(folder, vocab, tmpl)
    return dirs


def to_bin(st_folder: pathlib.Path, dst: pathlib.Path, shard_tensors: int | None) -> pathlib.Path:
    """Re-save a safetensors model folder as pytorch_model.bin (shard_tensors None) or sharded .bin + index."""
    shutil.copytree(st_folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    sd = load_model(str(st_folder))
    names = sorted(sd)
    if shard_tensors is None:
        torch.save(OrderedDict((n, sd[n]) for n in names), dst / "pytorch_model.bin")
        return dst
    groups = [names[i:i + shard_tensors] for i in range(0, len(names), shard_tensors)]
    wm = {}
    for k, group in enumerate(groups):
        fname = f"pytorch_model-{k + 1:05d}-of-{len(groups):05d}.bin"
        torch.save(OrderedDict((n, sd[n]) for n in group), dst / fname)
        wm.update({n: fname for n in group})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": wm}, indent=2))
    return dst
